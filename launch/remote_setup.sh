#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/tpu_vm.sh install): makes a virtual environment with a
# current CPython and installs the checkout in it with its TPU extra (-e "REPO[tpu]").
#
# Usage: remote_setup.sh [--dry-run]
#
# The tpu-ubuntu2204-base image has Python 3.10; Ubuntu 22.04's python3.11 package is the
# release candidate 3.11.0~rc1, and 22.04 has no python3.12 package (JAX 0.11 needs >= 3.12).
# So the interpreter comes from uv (installed with the image's pip): `uv venv --python
# PYTHON_VERSION --managed-python`, a python-build-standalone CPython that uv
# downloads, never the system's. A virtual environment with another Python is made anew.
#
# Settings (environment variables):
#   REPO            the checkout, default ~/diffusion_jax
#   VENV            the virtual environment, default ~/diffusion_jax_venv
#   PYTHON_VERSION  its CPython, default 3.12 (a minor version, or an exact one: 3.12.11)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
((${#ARGS[@]} == 0 && ${#EXTRA_ARGS[@]} == 0)) || die "remote_setup.sh takes no arguments (see $0 --help)"
REPO="${REPO:-$HOME/diffusion_jax}"
VENV="${VENV:-$HOME/diffusion_jax_venv}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || die "PYTHON_VERSION=$PYTHON_VERSION is not a CPython version such as 3.12 or 3.12.11."
[[ -f "$REPO/pyproject.toml" ]] || die "no checkout at $REPO"

note "Plan: install $REPO with its TPU extra into $VENV (CPython $PYTHON_VERSION from uv) on $(hostname)$([[ "$DRY_RUN" == 1 ]] && echo ' [dry run: commands are only printed]')"
show_settings REPO VENV PYTHON_VERSION
note ""

# The bootstrap interpreter only runs uv: the image's python3.
if ! python3 -m pip --version >/dev/null 2>&1; then
  run sudo apt-get update -qq
  run sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
fi
run python3 -m pip install --user -q --upgrade uv
uv=(python3 -m uv)

# Keep an existing environment only when its Python is the one asked for.
have="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())' 2>/dev/null || true)"
if [[ -n "$have" && ("$have" == "$PYTHON_VERSION" || "$have" == "$PYTHON_VERSION".*) ]]; then
  note "# $VENV has Python $have; keeping it."
else
  if [[ -n "$have" ]]; then
    note "# $VENV has Python $have, not $PYTHON_VERSION: making it anew."
  fi
  run "${uv[@]}" venv --clear --seed --python "$PYTHON_VERSION" --managed-python "$VENV"
fi
run "${uv[@]}" pip install --python "$VENV/bin/python" -q -e "${REPO}[tpu]"
run "$VENV/bin/python" -c 'import platform, diffusion_jax, jax; print("diffusion_jax installed; Python", platform.python_version(), "jax", jax.__version__)'
[[ "$DRY_RUN" == 1 ]] || note "$(hostname): ready"
