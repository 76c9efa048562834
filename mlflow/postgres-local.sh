#!/usr/bin/env bash
# A PostgreSQL cluster for MLflow on this machine (Debian's postgresql package), listening on 127.0.0.1 only.
#   mlflow/postgres-local.sh start DIR [PORT] [PASSWORD]   # initdb if needed, start, create role+db "mlflow";
#                                                        # prints the BACKEND URI for mlflow/production.sh
#   mlflow/postgres-local.sh stop DIR
# PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user (DIR is chowned to it).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # runuser lives there; minimal environments (cron, CI) leave it out
cmd=${1:?start|stop}; dir=${2:?data directory}; port=${3:-5432}; password=${4:-mlflow}
pg_ctl=$(command -v pg_ctl 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)
bin=$(dirname "$(readlink -f "$pg_ctl")")
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "$cmd" in
  start)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir" && chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    fi
    as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1 || as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir" start >/dev/null
    as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -qtAc \
      "SELECT 1 FROM pg_roles WHERE rolname='mlflow'" | grep -q 1 ||
      as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -qc "CREATE ROLE mlflow LOGIN PASSWORD '$password'"
    as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -qtAc \
      "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 ||
      as_pg "$bin/psql" -h "$dir" -p "$port" -U postgres -qc "CREATE DATABASE mlflow OWNER mlflow"
    echo "postgresql+psycopg2://mlflow:$password@127.0.0.1:$port/mlflow"
    ;;
  stop) as_pg "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null ;;
  *) echo "usage: $0 start|stop DIR [PORT] [PASSWORD]" >&2; exit 2 ;;
esac
