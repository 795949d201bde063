"""JAX's persistent compilation cache for train, eval and sample (`config.compilation_cache`).

A restarted run, a resumed one after preemption, and every scheduled evaluation job find
their programs compiled by an earlier process with the same program, jax/libtpu version and
devices, and load them instead of compiling again. JAX keys an entry by the program, the
compiler options, the devices and the versions, so a stale entry is never used.
"""

from __future__ import annotations

import os

import jax
import ml_collections

AUTO = "auto"


def cache_dir(config: ml_collections.ConfigDict) -> str:
    """Where `config.compilation_cache` puts compiled programs: '' (off), 'auto'
    (`$DIFFUSION_JAX_CACHE/jax_compilation_cache`, default
    `~/.cache/diffusion_jax/jax_compilation_cache`), or the path given (local, or gs://
    through etils, which JAX uses for any non-local path)."""
    where = str(config.get("compilation_cache", AUTO)).strip()
    if where != AUTO:
        return where
    from diffusion_jax.metrics import inception  # the project's one cache-directory rule

    return os.fspath(inception.default_cache_dir() / "jax_compilation_cache")


def enable(config: ml_collections.ConfigDict) -> str:
    """Turns the cache on at `cache_dir(config)` (before the first compilation); returns
    the directory, '' when off. JAX writes entries of programs that took at least a second
    to compile, from process 0 only; every process reads them."""
    where = cache_dir(config)
    if where:
        jax.config.update("jax_compilation_cache_dir", where)
    return where
