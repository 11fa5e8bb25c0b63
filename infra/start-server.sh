#!/usr/bin/env bash
# A Prefect server on loopback and the work pools of deployments/prefect.yaml.
#   infra/start-server.sh                 # 127.0.0.1:4200, SQLite in $PREFECT_HOME
# Environment:
#   PREFECT_PORT (4200)
#   CURATE_SERVER_HOST (127.0.0.1: only this machine can reach it). Another address
#     (0.0.0.0 for every interface) lets workers on other hosts in, and anyone who can
#     reach the API can read its Secret blocks (the cloud credentials): so it needs
#     PREFECT_SERVER_API_AUTH_STRING too, or CURATE_SERVER_INSECURE=1 on a network you trust.
#   PREFECT_SERVER_API_AUTH_STRING=user:password   basic auth on the API and the UI
#     (clients and workers then need PREFECT_API_AUTH_STRING with the same value)
#   PREFECT_API_DATABASE_CONNECTION_URL            PostgreSQL for many workers, e.g.
#     postgresql+asyncpg://curate:secret@127.0.0.1:5432/prefect
# Nothing phones home by default: the server's telemetry, the SDK's analytics and the UI's
# promotional content are off. Ctrl-C (or SIGTERM) stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
host="${CURATE_SERVER_HOST:-127.0.0.1}"
port="${PREFECT_PORT:-4200}"
case "$host" in
  127.* | localhost | ::1) ;;
  *)
    if [[ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" && "${CURATE_SERVER_INSECURE:-}" != 1 ]]; then
      echo "start-server.sh: CURATE_SERVER_HOST=$host opens the API (and its Secret blocks) to" \
        "other machines: set PREFECT_SERVER_API_AUTH_STRING=user:password (or" \
        "CURATE_SERVER_INSECURE=1 on a network you trust)" >&2
      exit 2
    fi
    ;;
esac
# Defaults (a value already set wins):
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"  # heartbeat
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"  # the SDK's usage events (Prefect 3.8)
export PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="${PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT:-false}"
# Concurrency leases (a run's slot on its output, a deployment's limit) on disk in
# $PREFECT_HOME, not in the server's memory: a restarted server still knows who holds a
# slot, so it comes back when the run ends or its lease expires, instead of never.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="${PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE:-prefect.server.concurrency.lease_storage.filesystem}"
# This script's own client calls (the pools) go to the address the server listens on.
case "$host" in
  0.0.0.0 | :: | localhost) client_host=127.0.0.1 ;;
  *:*) client_host="[$host]" ;;
  *) client_host="$host" ;;
esac
export PREFECT_API_URL="http://${client_host}:${port}/api"
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
echo "Prefect UI: http://${client_host}:${port}  (API: $PREFECT_API_URL; Ctrl-C stops it)"
wait $server
