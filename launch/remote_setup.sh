#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/tpu_vm.sh install): puts Python 3.11 in a virtual
# environment (the tpu-ubuntu2204-base image has Python 3.10; diffusion_jax needs >= 3.11)
# and installs the checkout in ~/diffusion_jax with its TPU extra: pip install -e ".[tpu]".
#
# Settings: REPO (default ~/diffusion_jax), VENV (~/diffusion_jax_venv), PYTHON (python3.11).
set -euo pipefail
REPO="${REPO:-$HOME/diffusion_jax}"
VENV="${VENV:-$HOME/diffusion_jax_venv}"
PYTHON="${PYTHON:-python3.11}"

[[ -f "$REPO/pyproject.toml" ]] || { echo "error: no checkout at $REPO" >&2; exit 1; }
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PYTHON" "$PYTHON-venv"
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e "${REPO}[tpu]"
"$VENV/bin/python" -c 'import diffusion_jax, jax; print("diffusion_jax installed; jax", jax.__version__)'
echo "$(hostname): ready"
