#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/tpu_vm.sh train / stop).
#
# Usage: remote_train.sh CONFIG WORKDIR [MAIN_FLAGS ...]   start training in the background
#        remote_train.sh --stop                             SIGTERM it (it saves a checkpoint)
#
# On a pod slice (several workers) it reads the worker list and this worker's index from the
# TPU VM metadata and exports JAX_COORDINATOR_ADDRESS (worker 0, port JAX_COORDINATOR_PORT,
# default 8476), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# diffusion_jax.runtime.distributed.maybe_initialize_distributed passes to jax.distributed.initialize()
# (without them it would call initialize() with no arguments and let JAX read the same
# metadata; exporting them makes every worker log its role). Log: ~/diffusion_jax_train.log.
set -euo pipefail
REPO="${REPO:-$HOME/diffusion_jax}"
VENV="${VENV:-$HOME/diffusion_jax_venv}"
LOG="${LOG:-$HOME/diffusion_jax_train.log}"
PIDFILE="${PIDFILE:-$HOME/diffusion_jax_train.pid}"
METADATA=http://metadata.google.internal/computeMetadata/v1/instance/attributes

running_pid() {
  local pid
  [[ -f "$PIDFILE" ]] || return 1
  pid="$(cat "$PIDFILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

if [[ "${1:-}" == "--stop" ]]; then
  if pid="$(running_pid)"; then
    kill -TERM "$pid"
    echo "$(hostname): sent SIGTERM to training (pid $pid)"
  else
    echo "$(hostname): no training running"
  fi
  exit 0
fi

(($# >= 2)) || { echo "usage: $0 CONFIG WORKDIR [MAIN_FLAGS ...]" >&2; exit 2; }
config="$1"
workdir="$2"
shift 2
if pid="$(running_pid)"; then
  echo "error: $(hostname): training already runs (pid $pid); stop it first (launch/tpu_vm.sh stop)" >&2
  exit 1
fi

metadata() {
  curl -sf --max-time 5 -H "Metadata-Flavor: Google" "$METADATA/$1"
}

# worker-network-endpoints: "name:id:ip,..." (or "host,..."), ordered by worker index.
if endpoints="$(metadata worker-network-endpoints)" && [[ "$endpoints" == *,* ]]; then
  IFS=, read -r -a workers <<<"$endpoints"
  first="${workers[0]}"
  export JAX_COORDINATOR_ADDRESS="${first##*:}:${JAX_COORDINATOR_PORT:-8476}"
  export JAX_NUM_PROCESSES="${#workers[@]}"
  JAX_PROCESS_ID="$(metadata agent-worker-number)"
  export JAX_PROCESS_ID
  echo "$(hostname): process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES, coordinator $JAX_COORDINATOR_ADDRESS"
fi

cd "$REPO"
nohup "$VENV/bin/python" -m diffusion_jax.main --config "$config" --workdir "$workdir" "$@" \
  >"$LOG" 2>&1 </dev/null &
echo $! >"$PIDFILE"
echo "$(hostname): training started (pid $!), log $LOG"
