"""Which accelerator platforms a run may use, as JAX itself decided when it was imported.

`import jax` runs JAX's Cloud TPU setup: on a Cloud TPU VM with TPU chips it names the TPU
platform first (`jax.config.jax_platforms = 'tpu,cpu'`) unless the user chose platforms
(JAX_PLATFORMS). Left unset, JAX later tries every backend it knows; with libtpu installed (the
test extra installs it, for the TPU compiler) that includes the TPU plugin, which on a host
without TPU chips prints its probe error ("unexpected worker hostname ...") before JAX falls
back to the CPU. `skip_tpu_off_tpu_vms` acts on JAX's decision, so that it never prints there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import pkgutil

import jax


def cloud_tpu_vm() -> bool:
    """Whether the TPU platform is to be used: JAX found a Cloud TPU VM, or the user named
    it."""
    return "tpu" in (jax.config.jax_platforms or "")


def _gpu_plugins() -> list[str]:
    """The PJRT plugins JAX would load besides the built-in ones (jax-cuda*, jax-rocm*): the
    `jax_plugins` namespace package's modules and the `jax_plugins` entry points."""
    names = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    return names


def skip_tpu_off_tpu_vms() -> None:
    """Where neither the user nor JAX's Cloud TPU setup chose platforms and JAX has no GPU
    plugin to try, the CPU is the only platform: JAX is told so before any backend starts,
    instead of probing libtpu. Call it before the first use of a device."""
    if jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None or _gpu_plugins():
        return
    jax.config.update("jax_platforms", "cpu")
