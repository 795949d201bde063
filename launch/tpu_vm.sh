#!/usr/bin/env bash
# Train diffusion_jax on a Cloud TPU VM: create it, install the package on every worker,
# start `python -m diffusion_jax.main` on all workers at once with a gs:// workdir.
#
# Usage: launch/tpu_vm.sh [--dry-run] [STEP ...] [-- MAIN_FLAGS ...]
#   STEP       create | install | train | logs | stop | delete  (default: create install train)
#   MAIN_FLAGS extra flags for diffusion_jax.main, e.g. -- --config.training.batch_size=256
#   --dry-run  print the commands without running them (settings are still checked)
#
# Settings (environment variables):
#   PROJECT           Google Cloud project (default: gcloud config get-value project)
#   ZONE              zone offering the accelerator (default: gcloud config get-value compute/zone);
#                     v3-8: us-central1-a/b or europe-west4-a; v3 pod slices (v3-32 and up):
#                     europe-west4-a only (https://cloud.google.com/tpu/docs/regions-zones)
#   BUCKET            GCS bucket for checkpoints and logs, NAME or gs://NAME (needed by train)
#   ACCELERATOR_TYPE  v3-8 (one host, 8 cores); launch/tpu_pod.sh sets v3-32 (4 hosts)
#   TPU_NAME          default: diffusion-jax-ACCELERATOR_TYPE
#   RUNTIME_VERSION   TPU VM image, default tpu-ubuntu2204-base
#   PYTHON_VERSION    CPython of the workers' virtual environment, default 3.12 (installed by
#                     uv; the image's Python is 3.10, launch/remote_setup.sh)
#   CONFIG            config file in the repository, default configs/cifar10.py
#   RUN               run name, default: the config's name (cifar10)
#   WORKDIR           default gs://BUCKET/RUN; must be on GCS (shared by all workers, survives
#                     preemption; training resumes from its latest checkpoint)
#   REPO_URL          git URL cloned on every worker (REPO_REF: branch or tag); empty: copy this
#                     checkout to the workers with `gcloud compute tpus tpu-vm scp`
#   SPOT=1            create a Spot TPU (cheaper; may be preempted, then rerun `train`)
#   SERVICE_ACCOUNT   service account for the TPU VM; it needs write access to the bucket
#
# Example: PROJECT=my-proj ZONE=europe-west4-a BUCKET=my-bucket launch/tpu_vm.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
STEPS=("${ARGS[@]}")
((${#STEPS[@]})) || STEPS=(create install train)
for step in "${STEPS[@]}"; do
  case "$step" in
    create | install | train | logs | stop | delete) ;;
    *) die "unknown step '$step'; steps: create install train logs stop delete" ;;
  esac
done

ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v3-8}"
TPU_NAME="${TPU_NAME:-diffusion-jax-$ACCELERATOR_TYPE}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || die "PYTHON_VERSION=$PYTHON_VERSION is not a CPython version such as 3.12 or 3.12.11."
CONFIG="${CONFIG:-configs/cifar10.py}"
RUN="${RUN:-$(basename "$CONFIG" .py)}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
SPOT="${SPOT:-0}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
# shellcheck disable=SC2088 # the tilde is expanded by the worker's shell
REMOTE_REPO="~/diffusion_jax"

require_config

require_gcloud
require_project
require_zone
WORKDIR="${WORKDIR:-}"
if [[ " ${STEPS[*]} " == *" train "* ]]; then
  if [[ -z "$WORKDIR" ]]; then
    require_bucket
    WORKDIR="gs://$BUCKET/$RUN"
  else
    [[ "$WORKDIR" == gs://* ]] || die "WORKDIR=$WORKDIR must be a gs:// path: every worker writes to it and it must outlive the TPU VM."
    BUCKET="${WORKDIR#gs://}"
    require_bucket
  fi
fi

TPU=(compute tpus tpu-vm)
WHERE=(--project="$PROJECT" --zone="$ZONE")

note "Plan: ${STEPS[*]} on TPU VM '$TPU_NAME' ($ACCELERATOR_TYPE)$([[ "$DRY_RUN" == 1 ]] && echo ' [dry run: commands are only printed]')"
show_settings PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION PYTHON_VERSION CONFIG WORKDIR \
  REPO_URL
note ""

step_create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  [[ -n "$SERVICE_ACCOUNT" ]] && extra+=(--service-account="$SERVICE_ACCOUNT" --scopes=https://www.googleapis.com/auth/cloud-platform)
  note "# Create the TPU VM (all its workers)."
  run gcloud "${TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
}

step_install() {
  local fetch
  if [[ -n "$REPO_URL" ]]; then
    note "# Clone $REPO_URL on every worker, then install it with the TPU extra (Python $PYTHON_VERSION)."
    local clone=(git clone --depth 1)
    [[ -n "$REPO_REF" ]] && clone+=(--branch "$REPO_REF")
    fetch="(command -v git >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq git)) && rm -rf $REMOTE_REPO && $(quote_cmd "${clone[@]}" "$REPO_URL") $REMOTE_REPO"
  else
    note "# Copy this checkout to every worker, then install it with the TPU extra (Python $PYTHON_VERSION)."
    local tarball
    tarball="${TMPDIR:-/tmp}/diffusion_jax_checkout.tar.gz"
    run tar -C "$REPO_ROOT" --exclude=.git --exclude=__pycache__ --exclude=.venv -czf "$tarball" .
    run gcloud "${TPU[@]}" scp "$tarball" "$TPU_NAME:diffusion_jax_checkout.tar.gz" \
      "${WHERE[@]}" --worker=all
    fetch="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf ~/diffusion_jax_checkout.tar.gz -C $REMOTE_REPO"
  fi
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="set -e; $fetch && PYTHON_VERSION=$PYTHON_VERSION bash $REMOTE_REPO/launch/remote_setup.sh"
}

step_train() {
  note "# Start training on all workers at once (each host feeds its shard; on a pod slice"
  note "# the workers join one jax.distributed job). Logs: ~/diffusion_jax_train.log per worker."
  local remote
  remote="bash $REMOTE_REPO/launch/remote_train.sh $(quote_cmd "$CONFIG" "$WORKDIR" "${EXTRA_ARGS[@]}")"
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$remote"
  note "# Follow it: launch/$(basename "$0") logs; TensorBoard: tensorboard --logdir $WORKDIR"
}

step_logs() {
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 \
    --command="tail -n 40 ~/diffusion_jax_train.log"
}

step_stop() {
  note "# SIGTERM makes training save a checkpoint before it exits; 'train' resumes from it."
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all \
    --command="bash $REMOTE_REPO/launch/remote_train.sh --stop"
}

step_delete() {
  run gcloud "${TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

for step in "${STEPS[@]}"; do
  "step_$step"
done
