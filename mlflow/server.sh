#!/usr/bin/env bash
# A lean local MLflow tracking server for farm (one worker, no job execution: ~0.5 GB, ~10 s to start),
# bound to 127.0.0.1. Artifacts are proxied by the server, so workers need no storage credentials.
#   mlflow/server.sh                                   # sqlite + local artifacts under .farm/server
#   ARTIFACTS=s3://bucket/mlflow mlflow/server.sh      # artifacts in S3 (set AWS_* / MLFLOW_S3_ENDPOINT_URL)
#   BACKEND=postgresql+psycopg2://user@host/db mlflow/server.sh
# Then: farm run JOB.yaml --tracking-uri http://127.0.0.1:${PORT:-5000}
set -euo pipefail
ROOT=${ROOT:-.farm/server}
mkdir -p "$ROOT"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-1}" \
  --backend-store-uri "${BACKEND:-sqlite:///$ROOT/mlflow.db}" \
  --artifacts-destination "${ARTIFACTS:-$ROOT/artifacts}"
