#!/usr/bin/env bash
# A Prefect server on loopback and the work pools of deployments/prefect.yaml.
#   infra/start-server.sh                 # 127.0.0.1:4200, SQLite in $PREFECT_HOME
# Environment:
#   PREFECT_PORT (4200), PREFECT_HOST (127.0.0.1: only this machine can reach it; set
#     0.0.0.0 for workers on other hosts, and then also an auth string)
#   PREFECT_SERVER_API_AUTH_STRING=user:password   basic auth on the API and the UI
#     (clients and workers then need PREFECT_API_AUTH_STRING with the same value)
#   PREFECT_API_DATABASE_CONNECTION_URL            PostgreSQL for many workers, e.g.
#     postgresql+asyncpg://curate:secret@127.0.0.1:5432/prefect
# Telemetry stays off. Ctrl-C (or SIGTERM) stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
host="${PREFECT_HOST:-127.0.0.1}"
port="${PREFECT_PORT:-4200}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:${port}/api"
if [[ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ]]; then
  export PREFECT_API_AUTH_STRING="$PREFECT_SERVER_API_AUTH_STRING"
fi
"$PREFECT" server start --host "$host" --port "$port" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT INT TERM
until "$PREFECT" work-pool ls >/dev/null 2>&1; do
  kill -0 $server 2>/dev/null || { echo "prefect server did not start" >&2; exit 1; }
  sleep 1
done
# Every pool the deployments name, process type.
for pool in $(sed -n 's/^      name: \(curate-[a-z-]*\)$/\1/p' deployments/prefect.yaml | sort -u); do
  "$PREFECT" work-pool create "$pool" --type process --overwrite >/dev/null
  echo "work pool $pool"
done
echo "Prefect UI: http://127.0.0.1:${port}  (API: $PREFECT_API_URL; Ctrl-C stops it)"
wait $server
