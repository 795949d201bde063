#!/usr/bin/env bash
# Reproduce the DDPM paper's CIFAR-10 table (FID 3.17, IS 9.46, NLL <= 3.75 bits/dim on the
# test set) from the released model: import google/ddpm-cifar10-32 into a workdir, then run
# the evaluation job on it once.
#
# First download the released model (diffusers format), e.g.
#   pip install -U huggingface_hub
#   huggingface-cli download google/ddpm-cifar10-32 --local-dir ddpm-cifar10-32
#
# Usage: launch/reproduce_cifar10.sh [--dry-run] [-- EVAL_FLAGS ...]
#   EVAL_FLAGS extra flags for the evaluation, e.g. a quick check with fewer samples:
#              -- --config.evals.fid.num_samples=5000
#
# Settings (environment variables):
#   SOURCE   the downloaded folder (config.json + diffusion_pytorch_model.*), default ddpm-cifar10-32
#   WORKDIR  where the imported checkpoint and the metrics go, local or gs://BUCKET/RUN
#            (default runs/ddpm_cifar10_released)
#   CONFIG   default configs/cifar10.py
#   PYTHON   interpreter with diffusion_jax installed (default python3)
# The evaluation also needs CIFAR-10 prepared for tfds (FID reference statistics, test bits/dim;
# python -m diffusion_jax.input_pipeline --prepare cifar10 --data_dir DIR, then add
# -- --config.data.data_dir=DIR) and the FID Inception weights (see README, Troubleshooting).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}' (flags for the evaluation go after --)"
SOURCE="${SOURCE:-ddpm-cifar10-32}"
WORKDIR="${WORKDIR:-runs/ddpm_cifar10_released}"
CONFIG="${CONFIG:-configs/cifar10.py}"
PYTHON="${PYTHON:-python3}"

download_hint="download it first: huggingface-cli download google/ddpm-cifar10-32 --local-dir $SOURCE (pip install -U huggingface_hub), or set SOURCE=path/to/ddpm-cifar10-32"
[[ -d "$SOURCE" ]] || die "SOURCE=$SOURCE is not a folder; $download_hint"
[[ -f "$SOURCE/config.json" ]] || die "$SOURCE has no config.json, so it is not a diffusers model folder; $download_hint"
compgen -G "$SOURCE/diffusion_pytorch_model.*" >/dev/null ||
  die "$SOURCE has no diffusion_pytorch_model.safetensors or .bin; $download_hint"
require_config
SOURCE="$(cd "$SOURCE" && pwd)"
if [[ "$WORKDIR" == gs://* ]]; then
  BUCKET="${WORKDIR#gs://}"
  require_bucket
else
  WORKDIR="$(absolute "$WORKDIR")"
fi

# True when WORKDIR/checkpoints has anything in it (the converter refuses such a workdir).
has_checkpoints() {
  if [[ "$1" == gs://* ]]; then
    have gcloud && [[ -n "$(gcloud storage ls "$1/checkpoints/" 2>/dev/null || true)" ]]
  else
    [[ -d "$1/checkpoints" && -n "$(ls -A "$1/checkpoints")" ]]
  fi
}

note "Plan: import $SOURCE into $WORKDIR, then evaluate it once$([[ "$DRY_RUN" == 1 ]] && echo ' [dry run]')"
show_settings SOURCE WORKDIR CONFIG PYTHON
note "Paper (Ho et al. 2020, Table 1): FID 3.17, IS 9.46 +- 0.11, NLL test <= 3.75 bits/dim."
note ""
cd "$REPO_ROOT"
if has_checkpoints "$WORKDIR"; then
  note "# $WORKDIR already holds checkpoints (imported before): skipping the conversion."
else
  run "$PYTHON" -m diffusion_jax.tools.convert --source "$SOURCE" --workdir "$WORKDIR" --config "$CONFIG"
fi
run "$PYTHON" -m diffusion_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
  --mode eval --config.eval.once=True "${EXTRA_ARGS[@]}"
note "Metrics: $WORKDIR/eval/metrics.jsonl; images: $WORKDIR/eval/"
