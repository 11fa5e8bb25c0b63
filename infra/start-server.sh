#!/usr/bin/env bash
# A local Prefect server (SQLite) and a process work pool for the curate deployments.
#   infra/start-server.sh            # server on 127.0.0.1:4200, pool curate-local
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
.venv/bin/prefect server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}" &
server=$!
trap 'kill $server' EXIT
until .venv/bin/prefect work-pool ls >/dev/null 2>&1; do sleep 1; done
.venv/bin/prefect work-pool create curate-local --type process --overwrite
echo "Prefect UI: http://127.0.0.1:${PREFECT_PORT:-4200}  (Ctrl-C stops it)"
wait $server
