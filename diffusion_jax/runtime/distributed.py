"""Device mesh and sharding helpers: data parallelism with `jax.jit` over a 1-D 'data' mesh.

Batches are sharded on their batch axis; the train state is replicated or, under ZeRO-1, split
over the 'data' axis (`split_over_data`).
The same code runs on 1 device, 8 TPU cores and many hosts (each host feeds its local shard).
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.request

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from diffusion_jax.runtime import errors, platforms

# Explicit settings for `jax.distributed.initialize`, each passed on only where it is given.
# JAX reads JAX_COORDINATOR_ADDRESS itself; the process count and index have no variable of
# JAX's own, so these two names are this package's (launch/remote_train.sh sets all three).
EXPLICIT_VARIABLES = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}

# The Compute Engine metadata of a Cloud TPU VM: its slice's workers, "name:id:ip,..." in
# worker order (what launch/remote_train.sh reads too).
TPU_WORKERS_URL = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "worker-network-endpoints"
)


def _int_variable(environ, name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise errors.UserError(f"{name}={value!r} is not an integer") from None
    if number < 0:
        raise errors.UserError(f"{name}={value!r} is negative")
    return number


def _tpu_processes_from_env(environ) -> int:
    """Processes of a TPU job described by environment variables (GKE sets them; they can be
    set by hand): hosts per slice (TPU_PROCESS_ADDRESSES, else TPU_WORKER_HOSTNAMES, the
    order in which JAX reads them) times MEGASCALE_NUM_SLICES; 1 when none is set."""
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    n_hosts = max(1, len([h for h in hosts.split(",") if h.strip()]))
    n_slices = _int_variable(environ, "MEGASCALE_NUM_SLICES") or 1
    if n_hosts > 1:
        _int_variable(environ, "TPU_WORKER_ID")  # JAX reads this worker's index from it
    return n_hosts * n_slices


def _launcher_processes(environ) -> int:
    """Processes that Slurm (SLURM_NTASKS in a job, SLURM_JOB_ID) or Open MPI
    (OMPI_COMM_WORLD_SIZE) started, by their documented variables; 1 outside them."""
    slurm = _int_variable(environ, "SLURM_NTASKS") if environ.get("SLURM_JOB_ID") else None
    return max(slurm or 1, _int_variable(environ, "OMPI_COMM_WORLD_SIZE") or 1)


def _fetch_tpu_workers(timeout: float = 5.0) -> str:
    """The TPU VM's worker list from the metadata server ('' when it does not answer)."""
    request = urllib.request.Request(TPU_WORKERS_URL, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except OSError as e:  # no metadata server: a TPU host outside Compute Engine
        logging.warning("jax.distributed: no TPU VM metadata (%s); one process", e)
        return ""


def _tpu_vm_processes() -> int:
    """Workers of the Cloud TPU VM slice this host is part of (1 off TPU VMs)."""
    if not platforms.cloud_tpu_vm():
        return 1
    return max(1, len([w for w in _fetch_tpu_workers().split(",") if w.strip()]))


def initialize_arguments(environ=None) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

    Any of `EXPLICIT_VARIABLES` set: those values (JAX detects the rest). Otherwise, when the
    environment describes several processes (GKE's TPU variables, Slurm's or Open MPI's, or
    the worker list of a Cloud TPU VM pod slice in its metadata), no arguments: JAX detects
    the cluster itself, as its documentation says to do there. A single host (a laptop, a
    one-host TPU VM, Colab) gets None."""
    environ = os.environ if environ is None else environ
    kwargs = {}
    for arg, name in EXPLICIT_VARIABLES.items():
        if arg == "coordinator_address":
            value = environ.get(name, "").strip() or None
        else:
            value = _int_variable(environ, name)
        if value is not None:
            kwargs[arg] = value
    if kwargs:
        return kwargs
    if _tpu_processes_from_env(environ) > 1 or _launcher_processes(environ) > 1:
        return {}
    if _tpu_vm_processes() > 1:
        return {}
    return None


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize(**initialize_arguments())` on multi-process runs;
    single-process runs skip it. First, the platforms as JAX decided them
    (`platforms.skip_tpu_off_tpu_vms`): both must precede the first use of a device."""
    platforms.skip_tpu_off_tpu_vms()
    kwargs = initialize_arguments()
    if kwargs is None:
        return
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices with the axis name 'data'."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


# XLA:CPU hands convolutions to YNNPACK by default, whose kernels slow down per image as the
# batch grows: a 32x32, 128-channel 3x3 convolution's forward and both gradients take 7.9 ms
# per image at batch 16 and 15.8 ms at batch 128, against 6.0 and 5.8 ms with XLA's Eigen
# kernels. Keeping YNNPACK for matrix products only makes the CIFAR-10 train step 1.6x faster
# at batch 64 and 1.9x at batch 128, and leaves batch 16 unchanged (BENCHMARKS.md).
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


@functools.cache
def _accepts(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jax/jaxlib compiles a program with these XLA options (older ones lack
    some; the program then compiles with XLA's defaults)."""
    try:
        x = jax.device_put(np.float32(0), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
    except Exception:  # noqa: BLE001 - an unknown option or an older jax.jit
        return False
    return True


def compiler_options(mesh: Mesh | None = None) -> dict[str, str]:
    """XLA compiler options for `jax.jit` programs on `mesh`'s devices (default: the default
    backend's): `CPU_COMPILER_OPTIONS` on CPU where supported, none elsewhere."""
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    if platform != "cpu" or not _accepts(tuple(CPU_COMPILER_OPTIONS.items())):
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def _single(mesh: Mesh) -> Sharding | None:
    """A 1-device mesh uses plain single-device placement: on XLA:CPU a NamedSharding, even
    over one device, routes the program through the SPMD partitioner and runs ~5x slower."""
    return SingleDeviceSharding(mesh.devices.flat[0]) if mesh.size == 1 else None


def replicated(mesh: Mesh) -> Sharding:
    return _single(mesh) or NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> Sharding:
    """Shards the batch axis, which follows `leading_axes` unsharded axes (e.g. K steps)."""
    return _single(mesh) or NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), "data"))


def split_over_data(mesh: Mesh, shape: tuple[int, ...]) -> Sharding:
    """ZeRO-1 placement of one array of `shape` (Rajbhandari et al. 2020, stage 1): its largest
    axis that the 'data' axis divides is split over it, so each device holds 1/N of it; an
    array without such an axis (a scalar, a bias of odd length) is replicated."""
    n = mesh.shape["data"]
    if mesh.size == 1 or n == 1:
        return replicated(mesh)
    axes = sorted((i for i, d in enumerate(shape) if d % n == 0), key=lambda i: -shape[i])
    if not axes:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[axes[0]] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def global_batch(local: dict, mesh: Mesh, leading_axes: int = 0) -> dict:
    """Assembles each host's local arrays into global arrays sharded over the mesh."""
    sharding = batch_sharded(mesh, leading_axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
