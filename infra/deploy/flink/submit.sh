#!/usr/bin/env bash
# Submit the ingest job to the Flink session cluster through the Beam job server.
#   BOOTSTRAP=headwater-kafka-bootstrap:9093 STREAM_ROOT=s3://bucket/streams/text \
#   infra/deploy/flink/submit.sh [--dry-run] [extra ingest flags...]
# Reach the job server first, e.g. `kubectl -n headwater port-forward svc/headwater-beam-job-server 8099 8098`
# and set JOB_ENDPOINT=localhost:8099 ARTIFACT_ENDPOINT=localhost:8098.
# --dry-run validates the options offline and prints the command.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
for v in BOOTSTRAP STREAM_ROOT; do
  [ -n "${!v:-}" ] || { echo "submit.sh: set $v" >&2; exit 2; }
done
PY=${PYTHON:-$root/.venv/bin/python}
[ -x "$PY" ] || PY=python3
mapfile -t opts < <(grep -v '^\s*#' "$here/pipeline-options.txt" | grep -v '^\s*$')
[ -n "${JOB_ENDPOINT:-}" ] && opts+=("--job_endpoint=$JOB_ENDPOINT")
[ -n "${ARTIFACT_ENDPOINT:-}" ] && opts+=("--artifact_endpoint=$ARTIFACT_ENDPOINT")
(cd "$root" && "$PY" -m infra.deploy.runner_options "${opts[@]}") >&2
cmd=("$PY" -m beam_jobs.ingest --bootstrap "$BOOTSTRAP" --stream-root "$STREAM_ROOT" --kafka_io xlang "$@" "${opts[@]}")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else cd "$root" && exec "${cmd[@]}"; fi
