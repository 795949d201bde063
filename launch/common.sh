# shellcheck shell=bash
# Shared helpers for the launch scripts; sourced, never run on its own.
#
# Provides: argument parsing (--dry-run, --help, STEP words, `-- FLAGS` for diffusion_jax.main),
# `run` (prints a command, then runs it unless --dry-run), and fail-fast checks for the
# Google Cloud settings (PROJECT, ZONE, BUCKET), which come from the environment.

# shellcheck disable=SC2034 # REPO_ROOT, ARGS and EXTRA_ARGS are used by the sourcing scripts
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
ARGS=()
EXTRA_ARGS=()

die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

note() {
  printf '%s\n' "$*"
}

# The script's leading comment block (after the shebang) is its help text.
usage() {
  sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
}

# Parses --dry-run, -h/--help, positional words (into ARGS) and everything after `--`
# (into EXTRA_ARGS, passed on to `python -m diffusion_jax.main`).
parse_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        EXTRA_ARGS=("$@")
        break
        ;;
      -*) die "unknown option '$1' (see $0 --help)" ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# Shell-quotes the arguments for display, so a printed command can be pasted into a shell.
quote_cmd() {
  local out="" arg sq="'" esc="'\\''"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$arg "
    elif [[ "$arg" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then # --flag='value with spaces'
      out+="${BASH_REMATCH[1]}'${BASH_REMATCH[2]//$sq/$esc}' "
    else
      out+="'${arg//$sq/$esc}' "
    fi
  done
  printf '%s' "${out% }"
}

# Prints the command; runs it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote_cmd "$@")"
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}

have() {
  command -v "$1" >/dev/null 2>&1
}

require_gcloud() {
  have gcloud && return 0
  if [[ "$DRY_RUN" == 1 ]]; then
    note "note: gcloud is not installed; --dry-run skips the checks that need it."
    return 0
  fi
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'."
}

# `gcloud config get-value KEY`, empty when unset or when gcloud is missing.
gcloud_value() {
  have gcloud || return 0
  local value
  value="$(gcloud config get-value "$1" 2>/dev/null || true)"
  [[ "$value" == "(unset)" ]] && value=""
  printf '%s' "$value"
}

require_project() {
  PROJECT="${PROJECT:-$(gcloud_value project)}"
  [[ -n "$PROJECT" ]] || die "no Google Cloud project: set PROJECT=your-project-id, or run 'gcloud config set project your-project-id'."
}

TPU_ZONES_URL=https://cloud.google.com/tpu/docs/regions-zones

# The zones that offer a TPU accelerator type (TPU_ZONES_URL, as of 2025; the page has the
# current list), space-separated; empty for a type not listed here. TPU v3 and v2 pod slices
# are not where their single-host types are: v3-32 and up exist only in europe-west4-a.
tpu_zones() {
  case "$1" in
    v2-8) echo "us-central1-b us-central1-c europe-west4-a asia-east1-c" ;;
    v2-*) echo "us-central1-a europe-west4-a" ;;
    v3-8) echo "us-central1-a us-central1-b europe-west4-a" ;;
    v3-*) echo "europe-west4-a" ;;
    v4-*) echo "us-central2-b" ;;
    v5litepod-* | v5e-*) echo "us-central1-a us-south1-a us-west1-c us-west4-a" ;;
    v5p-*) echo "us-central1-a us-east5-a" ;;
    v6e-*) echo "us-central1-b us-east1-d us-east5-a us-east5-b europe-west4-a" ;;
    *) echo "" ;;
  esac
}

# Sets ZONE (the environment, else the gcloud default); fails when there is none, naming the
# zones that offer ACCELERATOR_TYPE. A zone that does not offer it (by `tpu_zones`) gets a
# warning, not an error (the list may be out of date): gcloud would fail to create the TPU.
require_zone() {
  ZONE="${ZONE:-$(gcloud_value compute/zone)}"
  local type="${ACCELERATOR_TYPE:-}" zones=""
  [[ -n "$type" ]] && zones="$(tpu_zones "$type")"
  if [[ -z "$ZONE" ]]; then
    die "no zone: set ZONE to a zone that offers ${type:-the accelerator}${zones:+: ${zones// /, }} (zones by TPU type: $TPU_ZONES_URL), or run 'gcloud config set compute/zone ZONE'."
  fi
  if [[ -n "$zones" && " $zones " != *" $ZONE "* ]]; then
    note "warning: ZONE=$ZONE is not among the zones that offer $type (${zones// /, }; see $TPU_ZONES_URL): creating it there will fail."
  fi
  return 0
}

# BUCKET may be given as NAME or gs://NAME; afterwards it is the bare name.
require_bucket() {
  BUCKET="${BUCKET:-}"
  BUCKET="${BUCKET#gs://}"
  BUCKET="${BUCKET%%/*}"
  [[ -n "$BUCKET" ]] || die "BUCKET is not set: set BUCKET=your-bucket (checkpoints and logs go to gs://BUCKET/RUN); create one with 'gcloud storage buckets create gs://your-bucket --location=REGION'."
  check_gcs_access "gs://$BUCKET"
}

# Fails unless the gs:// location can be listed (exists and is readable with the current login).
check_gcs_access() {
  local url="$1"
  if have gcloud; then
    gcloud storage ls "$url" >/dev/null 2>&1 ||
      die "cannot list $url: the bucket does not exist or this account ($(gcloud_value account)) may not read it. Check with 'gcloud storage ls $url'."
  elif have gsutil; then
    gsutil ls "$url" >/dev/null 2>&1 ||
      die "cannot list $url: the bucket does not exist or is not readable. Check with 'gsutil ls $url'."
  elif [[ "$DRY_RUN" == 1 ]]; then
    note "note: neither gcloud nor gsutil is installed; not checking $url."
  else
    die "cannot check $url: neither gcloud nor gsutil is installed."
  fi
}

# CONFIG is a path relative to the repository root (or absolute).
require_config() {
  (cd "$REPO_ROOT" && [[ -f "$CONFIG" ]]) || die "CONFIG=$CONFIG is not a file (paths are relative to $REPO_ROOT, e.g. configs/cifar10.py)."
}

# Makes a local path absolute (the scripts run their commands from the repository root).
absolute() {
  if [[ "$1" == /* || "$1" == gs://* ]]; then printf '%s' "$1"; else printf '%s' "$PWD/$1"; fi
}

# Prints "  NAME = value" lines for the given variable names.
show_settings() {
  local name
  for name in "$@"; do
    printf '  %-18s %s\n' "$name" "${!name:-}"
  done
}
