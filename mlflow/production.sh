#!/usr/bin/env bash
# MLflow as a shared service for farm: PostgreSQL backend store, artifacts in S3 *proxied by the server*
# (farm's drivers and Ray workers upload through MLflow's HTTP API, so they need no S3 credentials; only this
# process has them), one gunicorn worker per CPU.
#   BACKEND=postgresql+psycopg2://mlflow:PASSWORD@db:5432/mlflow \
#   ARTIFACTS=s3://bucket/mlflow AWS_PROFILE=mlflow-server mlflow/production.sh
# Needs `pip install psycopg2-binary` (SQLAlchemy 2.1's plain postgresql:// means psycopg 3). For a
# PostgreSQL on this machine, mlflow/postgres-local.sh start prints a BACKEND to use.
# Put authentication in front of it (a reverse proxy, or MLflow's `--app-name basic-auth`) before exposing it.
set -euo pipefail
: "${BACKEND:?set BACKEND=postgresql+psycopg2://user:password@host:5432/database}"
: "${ARTIFACTS:?set ARTIFACTS=s3://bucket/prefix (the server uses its own AWS credentials)}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" --workers "${WORKERS:-$(nproc)}" \
  --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
