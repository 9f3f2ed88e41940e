#!/usr/bin/env bash
# Deploy the Convex functions in convex/ (schema.ts, video.ts, builders.ts) to a Convex deployment.
#
#   CONVEX_DEPLOY_KEY=prod:... ./deploy/convex-deploy.sh
#
# convex/ keeps its own package.json and node_modules for type-checking, and Convex would treat
# node_modules inside the functions folder as code, so the deploy runs from a clean staging
# project: package.json at its root, the .ts files in its convex/ folder.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CONVEX_DEPLOY_KEY:?set CONVEX_DEPLOY_KEY (Convex dashboard > Settings > Deploy keys)}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/convex"
cp convex/package.json convex/package-lock.json "$stage/"
cp convex/*.ts convex/tsconfig.json "$stage/convex/"
cd "$stage"
npm ci --no-audit --no-fund --loglevel=error
npx --no-install tsc --noEmit -p convex
npx --no-install convex deploy --yes
