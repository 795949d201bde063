#!/usr/bin/env bash
# Evaluate the latest checkpoint of a training run, unless WORKDIR/eval/metrics.jsonl already
# has it, then exit (--config.eval.once=True): the job that launch/cron, launch/systemd and
# launch/k8s run on a schedule. (Without --config.eval.once=True the job instead stays up and
# evaluates every checkpoint as it appears.) Run it on a machine with an accelerator other
# than the training TPU, whose devices the training holds.
#
# Usage: launch/eval_once.sh [--dry-run] [-- MAIN_FLAGS ...]
#   MAIN_FLAGS extra flags for diffusion_jax.main, e.g. -- --config.evals.fid.num_samples=10000
#
# Settings (environment variables):
#   WORKDIR    the training run, gs://BUCKET/RUN or a local folder (default gs://BUCKET/RUN)
#   BUCKET     GCS bucket, used when WORKDIR is not set; RUN defaults to the config's name
#   CONFIG     the run's config, default configs/cifar10.py; pass the training's --config.*
#              overrides of the model after -- too (a different model shape is refused)
#   PYTHON     interpreter with diffusion_jax installed (default python3)
#   LOCK_FILE  a run that finds it locked exits at once (default /tmp/diffusion_jax_eval.lock)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (flags for diffusion_jax.main go after --)"
CONFIG="${CONFIG:-configs/cifar10.py}"
RUN="${RUN:-$(basename "$CONFIG" .py)}"
PYTHON="${PYTHON:-python3}"
LOCK_FILE="${LOCK_FILE:-/tmp/diffusion_jax_eval.lock}"
WORKDIR="${WORKDIR:-}"

require_config
if [[ -z "$WORKDIR" ]]; then
  require_bucket
  WORKDIR="gs://$BUCKET/$RUN"
elif [[ "$WORKDIR" == gs://* ]]; then
  BUCKET="${WORKDIR#gs://}"
  require_bucket
else
  [[ -d "$WORKDIR" ]] || die "WORKDIR=$WORKDIR does not exist."
  WORKDIR="$(absolute "$WORKDIR")"
fi

note "Plan: evaluate the latest checkpoint in $WORKDIR once, then exit$([[ "$DRY_RUN" == 1 ]] && echo ' [dry run]')"
show_settings CONFIG WORKDIR PYTHON LOCK_FILE
note "Metrics are appended to $WORKDIR/eval/metrics.jsonl, pictures go to $WORKDIR/eval/."
cmd=("$PYTHON" -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR"
  --mode eval --config.eval.once=True "${EXTRA_ARGS[@]}")
cd "$REPO_ROOT"
if have flock; then
  # -E 0: another evaluation still holds the lock; this run has nothing to do.
  run flock --nonblock --conflict-exit-code 0 "$LOCK_FILE" "${cmd[@]}"
else
  run "${cmd[@]}"
fi
