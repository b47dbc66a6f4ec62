#!/usr/bin/env bash
# Build the flex template spec and launch the headwater ingest job on Dataflow.
#   PROJECT=my-proj REGION=us-central1 BUCKET=my-bucket IMAGE=us-docker.pkg.dev/my-proj/hw/ingest:v1 \
#   BOOTSTRAP=kafka-bootstrap:9093 STREAM_ROOT=s3://my-streams/text \
#   infra/deploy/dataflow/launch.sh [--dry-run]
# --dry-run validates the pipeline options offline and prints the gcloud commands instead of
# running them. Kafka SASL/TLS settings reach workers as HEADWATER_KAFKA_* env and Secret
# Manager-mounted files; nothing secret is passed on the command line. Parameters use gcloud's
# ^~^ delimiter because bootstrap lists and topics contain commas.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1
for v in PROJECT REGION BUCKET IMAGE BOOTSTRAP STREAM_ROOT; do
  [ -n "${!v:-}" ] || { echo "launch.sh: set $v" >&2; exit 2; }
done
JOB_NAME=${JOB_NAME:-headwater-ingest-$(date +%Y%m%d-%H%M%S)}
TEMPLATE=gs://$BUCKET/templates/headwater-ingest.json
PY=${PYTHON:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=python3

pipeline_opts=(--runner DataflowRunner --project "$PROJECT" --region "$REGION" --streaming
  --temp_location "gs://$BUCKET/tmp" --staging_location "gs://$BUCKET/staging"
  --sdk_container_image "$IMAGE" --job_name "$JOB_NAME"
  --max_num_workers "${MAX_WORKERS:-20}" --autoscaling_algorithm THROUGHPUT_BASED)
(cd "$root" && "$PY" -m infra.deploy.runner_options "${pipeline_opts[@]}") >&2

build=(gcloud dataflow flex-template build "$TEMPLATE" --image "$IMAGE" --sdk-language PYTHON
  --metadata-file "$here/metadata.json" --project "$PROJECT")
run=(gcloud dataflow flex-template run "$JOB_NAME" --template-file-gcs-location "$TEMPLATE"
  --project "$PROJECT" --region "$REGION" --temp-location "gs://$BUCKET/tmp"
  --staging-location "gs://$BUCKET/staging" --max-workers "${MAX_WORKERS:-20}"
  --additional-experiments enable_streaming_engine
  --parameters "^~^bootstrap=$BOOTSTRAP~stream-root=$STREAM_ROOT~topics=${TOPICS:-raw.text,raw.audio,raw.image,raw.video}~kafka_io=xlang~sdk_container_image=$IMAGE")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${build[@]}"; echo
  printf '%q ' "${run[@]}"; echo
else
  "${build[@]}"
  "${run[@]}"
fi
