#!/usr/bin/env bash
# Train on a TPU v3-32 pod slice (4 hosts x 8 cores): launch/tpu_vm.sh with
# ACCELERATOR_TYPE=v3-32. Same steps, flags and settings (see launch/tpu_vm.sh --help).
# Every step that runs on the VM runs on all 4 workers at once (--worker=all); training starts
# one process per host, which join one job through jax.distributed (launch/remote_train.sh),
# with the global batch (config.training.batch_size) split over the 32 cores. TPU v3 pod
# slices (v3-32 and up) exist only in europe-west4-a; a v3-8 also in us-central1-a and -b.
#
# Example: PROJECT=my-proj ZONE=europe-west4-a BUCKET=my-bucket launch/tpu_pod.sh
set -euo pipefail
export ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v3-32}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/tpu_vm.sh" "$@"
