"""The platforms a run uses, from JAX's own Cloud TPU detection (runtime/platforms.py)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from diffusion_jax.runtime import platforms

REPO = Path(__file__).resolve().parents[1]
PROBE = "TPU_WORKER_HOSTNAMES"  # libtpu's probe error names the variable it could not use


def _first_device(skip: bool) -> subprocess.CompletedProcess:
    """A fresh process that starts JAX with no platform chosen (as `python -m
    diffusion_jax.main` on a laptop), with or without `skip_tpu_off_tpu_vms` first."""
    code = "import jax\nfrom diffusion_jax.runtime import platforms\n"
    code += "platforms.skip_tpu_off_tpu_vms()\n" if skip else ""
    code += "print(jax.devices()[0].platform)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_cpu_host_starts_without_the_tpu_probe():
    """On this host (no TPU chips, no GPU plugin) JAX's setup names no platform; the run
    starts on the CPU without libtpu's probe error, which it prints otherwise (where the
    test extra installed libtpu)."""
    quiet = _first_device(skip=True)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert quiet.stdout.strip() == "cpu" and PROBE not in quiet.stderr, quiet.stderr[-2000:]
    if importlib.util.find_spec("libtpu") is not None:
        loud = _first_device(skip=False)
        assert loud.stdout.strip() == "cpu" and PROBE in loud.stderr, loud.stderr[-2000:]


@pytest.fixture
def platform_choice():
    """Sets jax_platforms for one test (the backends of this process are up already, so it
    changes nothing else) and restores it."""
    old = jax.config.jax_platforms
    yield lambda value: jax.config.update("jax_platforms", value)
    jax.config.update("jax_platforms", old)


@pytest.mark.parametrize("chosen", ["tpu,cpu", "cpu"])
def test_a_platform_chosen_by_jax_or_the_user_is_kept(chosen, platform_choice):
    """A Cloud TPU VM (JAX's setup wrote 'tpu,cpu') keeps its TPU; a user's choice stays."""
    platform_choice(chosen)
    platforms.skip_tpu_off_tpu_vms()
    assert jax.config.jax_platforms == chosen
    assert platforms.cloud_tpu_vm() == chosen.startswith("tpu")


def test_only_the_cpu_is_left_when_nothing_else_can_run(platform_choice, monkeypatch):
    platform_choice(None)
    monkeypatch.setattr(platforms, "_gpu_plugins", lambda: ["xla_cuda12"])
    platforms.skip_tpu_off_tpu_vms()
    assert jax.config.jax_platforms is None  # a GPU plugin: JAX keeps choosing
    monkeypatch.setattr(platforms, "_gpu_plugins", lambda: [])
    platforms.skip_tpu_off_tpu_vms()
    assert jax.config.jax_platforms == ("cpu" if importlib.util.find_spec("libtpu") else None)


def test_every_command_skips_the_probe_before_starting_jax():
    """Each command-line module (one with a `main`) tells JAX the platforms before its first
    device, directly or through `distributed.maybe_initialize_distributed`; only the
    TPU compiler (`tools/aot.py`) and the dataset preparation (no JAX device) are exempt."""
    import ast

    exempt = {"tools/aot.py", "input_pipeline/prepare.py"}
    package = REPO / "diffusion_jax"
    checked = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        tree = ast.parse(path.read_text())
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        if rel in exempt or not mains:
            continue
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert names & {"skip_tpu_off_tpu_vms", "maybe_initialize_distributed"}, rel
        checked.append(rel)
    assert {"main.py", "tools/benchmark/sampler_quality.py", "tools/convert/cli.py"} <= set(
        checked
    ), checked
