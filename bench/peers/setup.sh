#!/usr/bin/env bash
# The open-source peers bench/eval_real.py compares against, each in its own environment so none of
# their dependencies touch the service's. Usage: bench/peers/setup.sh [DIR] (default .bench-peers).
set -euo pipefail
dir="${1:-.bench-peers}"
python3 -m venv "$dir/clipsmith"
# clipsmith-ai (MIT): only its chat candidate builder runs, so its heavy extras are skipped.
"$dir/clipsmith/bin/pip" install -q --no-deps clipsmith-ai==0.2.1
"$dir/clipsmith/bin/pip" install -q pydantic pydantic-settings pyyaml httpx
echo "peer ready: $dir/clipsmith/bin/python bench/peers/clipsmith_adapter.py"
