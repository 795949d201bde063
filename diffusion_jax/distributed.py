"""Device mesh and sharding helpers: data parallelism with `jax.jit` over a 1-D 'data' mesh.

Parameters, EMA and optimiser state are replicated; batches are sharded on their batch axis.
The same code runs on 1 device, 8 TPU cores and many hosts (each host feeds its local shard).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` on multi-host runs (TPU pods, or when the
    coordinator is given through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    Single-host runs skip it."""
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    on_pod = os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    if not (explicit or on_pod):
        return
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
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


def global_batch(local: dict, mesh: Mesh, leading_axes: int = 0) -> dict:
    """Assembles each host's local arrays into global arrays sharded over the mesh."""
    sharding = batch_sharded(mesh, leading_axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
