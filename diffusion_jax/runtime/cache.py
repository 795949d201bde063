"""The project's cache directory, and JAX's persistent compilation cache in it.

`default_cache_dir` is the one rule for where downloaded or derived files live (FID Inception
weights, FID reference statistics, the digits classifier, compiled programs). The compilation
cache (`config.compilation_cache`) serves train, eval and sample:

A restarted run, a resumed one after preemption, and every scheduled evaluation job find
their programs compiled by an earlier process with the same program, jax/libtpu version and
devices, and load them instead of compiling again. JAX keys an entry by the program, the
compiler options, the devices and the versions, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

AUTO = "auto"


def default_cache_dir() -> Path:
    """``$DIFFUSION_JAX_CACHE`` if set, else ``~/.cache/diffusion_jax``."""
    env = os.environ.get("DIFFUSION_JAX_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusion_jax"


def cache_dir(config: ml_collections.ConfigDict) -> str:
    """Where `config.compilation_cache` puts compiled programs: '' (off), 'auto'
    (`$DIFFUSION_JAX_CACHE/jax_compilation_cache`, default
    `~/.cache/diffusion_jax/jax_compilation_cache`), or the path given (local, or gs://
    through etils, which JAX uses for any non-local path)."""
    where = str(config.get("compilation_cache", AUTO)).strip()
    if where != AUTO:
        return where
    return os.fspath(default_cache_dir() / "jax_compilation_cache")


def enable(config: ml_collections.ConfigDict) -> str:
    """Turns the cache on at `cache_dir(config)` (before the first compilation); returns
    the directory, '' when off. JAX writes entries of programs that took at least a second
    to compile, from process 0 only; every process reads them."""
    where = cache_dir(config)
    if where:
        jax.config.update("jax_compilation_cache_dir", where)
    return where
