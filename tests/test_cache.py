"""`config.compilation_cache`: a second process loads the first one's compiled program."""

from __future__ import annotations

import subprocess
import sys

import ml_collections
import pytest
from conftest import REPO

from diffusion_jax.runtime import cache

# Compiles one program with the cache at argv[1] and prints how many compilations it loaded
# from the cache (JAX's own monitoring event).
PROGRAM = """
import sys
import jax, ml_collections
from diffusion_jax.runtime import cache
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
cache.enable(ml_collections.ConfigDict({"compilation_cache": sys.argv[1]}))
jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


def _hits(where: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, where],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.split()[-1])


def test_a_second_process_loads_the_compiled_program(tmp_path):
    where = tmp_path / "cache"
    assert _hits(str(where)) == 0
    assert any(where.iterdir())
    assert _hits(str(where)) > 0  # the jitted function (and jnp.ones) from the cache
    assert _hits("") == 0  # off


@pytest.mark.parametrize(
    "value, expected",
    [("", ""), ("/some/dir", "/some/dir"), ("gs://bucket/jax_cache", "gs://bucket/jax_cache")],
)
def test_cache_dir(value, expected):
    config = ml_collections.ConfigDict({"compilation_cache": value})
    assert cache.cache_dir(config) == expected


def test_auto_is_under_the_project_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_JAX_CACHE", str(tmp_path))
    config = ml_collections.ConfigDict({"compilation_cache": "auto"})
    assert cache.cache_dir(config) == str(tmp_path / "jax_compilation_cache")
