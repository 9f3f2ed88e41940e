#!/usr/bin/env bash
# Build the image and deploy KlipStream Analysis to Cloud Run (docs/deploy.md walks through the
# one-time set-up: Artifact Registry, buckets, service account, Secret Manager, Convex).
#
#   PROJECT_ID=my-proj ./deploy/deploy.sh                 # CPU service
#   PROJECT_ID=my-proj VARIANT=gpu ./deploy/deploy.sh     # NVIDIA L4 variant
#   PROJECT_ID=my-proj VARIANT=cluster CLOUDSQL_INSTANCE=my-proj:us-central1:klipstream-db ./deploy/deploy.sh
#                                                         # several instances on Cloud SQL (docs/deploy.md)
#
# Variables: PROJECT_ID (required), REGION (us-central1), SERVICE (klipstream-analysis, or
# klipstream-analysis-gpu for VARIANT=gpu), REPOSITORY (klipstream, an Artifact Registry Docker
# repository), SERVICE_ACCOUNT (klipstream-analysis@PROJECT_ID.iam.gserviceaccount.com),
# CONVEX_URL (empty: mirror off), WHISPER_MODEL (model directory in the build context to bake in),
# BUILDER (cloudbuild | docker; default cloudbuild), TAG (git short hash or a timestamp).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PROJECT_ID:?set PROJECT_ID to the Google Cloud project}"
REGION="${REGION:-us-central1}"
VARIANT="${VARIANT:-cpu}"
case "$VARIANT" in
  cpu) MANIFEST=deploy/cloudrun.yaml; DEFAULT_SERVICE=klipstream-analysis; WITH_CUDA="" ;;
  gpu) MANIFEST=deploy/cloudrun-gpu.yaml; DEFAULT_SERVICE=klipstream-analysis-gpu; WITH_CUDA=1 ;;
  cluster) MANIFEST=deploy/cloudrun-cluster.yaml; DEFAULT_SERVICE=klipstream-analysis; WITH_CUDA="" ;;
  *) echo "VARIANT must be cpu, gpu or cluster" >&2; exit 2 ;;
esac
SERVICE="${SERVICE:-$DEFAULT_SERVICE}"
CLOUDSQL_INSTANCE="${CLOUDSQL_INSTANCE:-}"  # PROJECT:REGION:INSTANCE, VARIANT=cluster only
MAX_INSTANCES="${MAX_INSTANCES:-4}"  # VARIANT=cluster only
if [ "$VARIANT" = cluster ] && [ -z "$CLOUDSQL_INSTANCE" ]; then
  echo "VARIANT=cluster needs CLOUDSQL_INSTANCE=PROJECT:REGION:INSTANCE (docs/deploy.md)" >&2
  exit 2
fi
REPOSITORY="${REPOSITORY:-klipstream}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-klipstream-analysis@${PROJECT_ID}.iam.gserviceaccount.com}"
CONVEX_URL="${CONVEX_URL:-}"
WHISPER_MODEL="${WHISPER_MODEL:-}"
BUILDER="${BUILDER:-cloudbuild}"
TAG="${TAG:-$(git rev-parse --short HEAD 2>/dev/null || date +%Y%m%d%H%M%S)}"
IMAGE="${REGION}-docker.pkg.dev/${PROJECT_ID}/${REPOSITORY}/${SERVICE}:${TAG}"

if [ -n "$WHISPER_MODEL" ] && [ ! -f "$WHISPER_MODEL/model.bin" ]; then
  echo "WHISPER_MODEL=$WHISPER_MODEL: no model.bin there (it must be a CTranslate2 model inside this repository)" >&2
  exit 2
fi
secrets="klipstream-admin-token klipstream-api-keys klipstream-convex-secret klipstream-webhook-secret"
[ "$VARIANT" = cluster ] && secrets="$secrets klipstream-database-url"
for secret in $secrets; do
  if ! gcloud secrets describe "$secret" --project "$PROJECT_ID" >/dev/null 2>&1; then
    echo "Secret Manager secret $secret is missing; see docs/deploy.md (create it, even with a placeholder)" >&2
    exit 2
  fi
done

echo "==> building $IMAGE ($VARIANT, builder $BUILDER)"
if [ "$BUILDER" = docker ]; then
  DOCKER_BUILDKIT=1 docker build \
    --build-arg WHISPER_MODEL="$WHISPER_MODEL" --build-arg WITH_CUDA="$WITH_CUDA" -t "$IMAGE" .
  docker push "$IMAGE"
else
  config="$(mktemp)"
  trap 'rm -f "$config"' EXIT
  cat >"$config" <<YAML
steps:
  - name: gcr.io/cloud-builders/docker
    env: ["DOCKER_BUILDKIT=1"]
    args: ["build", "--build-arg", "WHISPER_MODEL=${WHISPER_MODEL}", "--build-arg", "WITH_CUDA=${WITH_CUDA}",
           "-t", "${IMAGE}", "."]
images: ["${IMAGE}"]
options:
  machineType: E2_HIGHCPU_8
timeout: 3600s
YAML
  gcloud builds submit --project "$PROJECT_ID" --region "$REGION" --config "$config" .
fi

echo "==> deploying $SERVICE to $REGION"
manifest="$(mktemp)"
sed -e "s|__SERVICE_ACCOUNT__|${SERVICE_ACCOUNT}|g" \
    -e "s|__SERVICE__|${SERVICE}|g" \
    -e "s|__REGION__|${REGION}|g" \
    -e "s|__IMAGE__|${IMAGE}|g" \
    -e "s|__CONVEX_URL__|${CONVEX_URL}|g" \
    -e "s|__CLOUDSQL_INSTANCE__|${CLOUDSQL_INSTANCE}|g" \
    -e "s|__MAX_INSTANCES__|${MAX_INSTANCES}|g" \
    "$MANIFEST" >"$manifest"
gcloud run services replace "$manifest" --project "$PROJECT_ID" --region "$REGION"
rm -f "$manifest"
gcloud run services describe "$SERVICE" --project "$PROJECT_ID" --region "$REGION" --format 'value(status.url)'
