#!/usr/bin/env bash
# Process workers for one work pool, on this machine, until Ctrl-C (or SIGTERM).
#   infra/start-workers.sh curate-cpu 2          # two CPU workers
#   CURATE_GPUS=0,1 infra/start-workers.sh curate-gpu   # one worker per GPU
# A pipeline worker (curate-local) runs one pipeline at a time (--limit 1): runs it cannot
# start yet wait in the queue, not in the server's 20 s retries of a refused slot. A CPU
# worker runs one flow run at a time too, so that N CPU workers are N checks at once. A
# GPU worker (a pool named *gpu*) takes two: the second starts its process and builds its
# model while the first embeds, and the embed flow's slot per device (a global concurrency
# limit, orchestration.embeds_per_device) keeps the GPU to one embedding at a time.
# CURATE_RUNS_PER_WORKER sets --limit for any pool.
# CURATE_GPUS: one worker per listed GPU, each with CUDA_VISIBLE_DEVICES set to it.
# Run from anywhere; needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING if the server
# has one). Worker logs: $CURATE_WORKER_LOGS/<pool>-<n>.log (default: the terminal).
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT="${PREFECT:-.venv/bin/prefect}"
pool="${1:?usage: infra/start-workers.sh POOL [N]}"
count="${2:-1}"
case "$pool" in
  *gpu*) limit="${CURATE_RUNS_PER_WORKER:-2}" ;;
  *) limit="${CURATE_RUNS_PER_WORKER:-1}" ;;
esac
: "${PREFECT_API_URL:?set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)}"
# Flow runs send a heartbeat every 30 s: the pipeline tells a lost child by them.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY="${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1  # no telemetry, no SDK analytics

devices=()
if [[ -n "${CURATE_GPUS:-}" ]]; then
  IFS=, read -ra devices <<<"$CURATE_GPUS"
  count=${#devices[@]}
fi
pids=()
alive() {
  local pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop() {
  # An idle worker may ignore the first SIGTERM: ask twice, then kill what is left.
  local signal
  for signal in TERM TERM KILL; do
    alive || return 0
    kill -s "$signal" "${pids[@]}" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      alive || return 0
      sleep 0.5
    done
  done
}
trap 'stop; exit 0' INT TERM
trap stop EXIT
for ((i = 0; i < count; i++)); do
  name="$pool-$(hostname)-$i"
  env=()
  if ((${#devices[@]})); then
    env=(CUDA_VISIBLE_DEVICES="${devices[$i]}")
    name="$pool-$(hostname)-gpu${devices[$i]}"
  fi
  log=/dev/stdout
  if [[ -n "${CURATE_WORKER_LOGS:-}" ]]; then
    mkdir -p "$CURATE_WORKER_LOGS"
    log="$CURATE_WORKER_LOGS/$pool-$i.log"
  fi
  env "${env[@]}" "$PREFECT" worker start --pool "$pool" --type process --name "$name" \
    --limit "$limit" >>"$log" 2>&1 &
  pids+=($!)
  echo "worker $name (pid $!) on pool $pool"
done
wait
