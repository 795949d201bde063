"""launch/colab_tpu.ipynb runs top to bottom, headless, on the CPU with a tiny setting: the
parameters cell gets overrides appended (20 steps, a one-level U-Net, a short chain) and the
released-model section runs on a tiny synthetic diffusers folder, so the notebook cannot rot."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_convert import DIFFUSERS_CONFIG, diffusers_shapes, random_state_dict, write_diffusers

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_tpu.ipynb"
PNG_MAGIC = b"\x89PNG"


def tiny_parameters(workdir: Path, released_dir: Path) -> str:
    return "\n".join(
        [
            "",
            "# --- tiny CPU setting injected by tests/test_notebook.py ---",
            f"WORKDIR = {str(workdir)!r}",
            "NUM_STEPS = 20",
            "BATCH_SIZE = 16",
            "CONFIG_OVERRIDES = {'model.ch': 16, 'model.num_groups': 4, 'model.ch_mult': (1,),"
            " 'model.attn_resolutions': ()}",
            "NUM_SAMPLES = 8",
            "SAMPLING_STEPS = '20'",
            "SNAPSHOT_EVERY = 5",
            f"RELEASED_DIR = {str(released_dir)!r}",
            "RELEASED_NUM_SAMPLES = 2",
            "RELEASED_SAMPLING = 'ddim4'",
        ]
    )


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for name in ("REPO_URL", "NUM_STEPS", "CONFIG_OVERRIDES", "RELEASED_DIR"):
        assert f"\n{name} = " in "\n" + params[0].source
    assert 'CONFIG = "configs/digits.py"' in params[0].source
    assert nb.metadata.get("accelerator") == "TPU"
    assert all(c.cell_type != "code" or not c.outputs for c in nb.cells), "commit it unexecuted"
    source = "\n".join(c.source for c in nb.cells)
    assert "huggingface-cli download google/ddpm-cifar10-32" in source
    assert "loop.train(config, WORKDIR)" in source


def install_cell_functions() -> dict:
    """The functions (and imports) of the install cell, without running its install."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c for c in nb.cells if "def install_command(" in c.source]
    tree = ast.parse(cell.source)
    tree.body = [
        n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom | ast.FunctionDef)
    ]
    namespace = {}
    exec(compile(tree, str(NOTEBOOK), "exec"), namespace)
    return namespace


def test_install_without_libtpu_takes_the_tpu_extra():
    command = install_cell_functions()["install_command"]("/content/diffusion_jax", None)
    assert command == [
        sys.executable,
        *"-m pip install -q -e".split(),
        "/content/diffusion_jax[tpu]",
    ]


def test_install_with_libtpu_keeps_the_runtime_jax():
    """Colab's TPU runtime: no tpu extra (it would replace libtpu), jax and jaxlib held."""
    command = install_cell_functions()["install_command"]("/content/diffusion_jax", "libtpu 0.0.21")
    assert command[:6] == [sys.executable, *"-m pip install -q -e".split()]
    assert command[6] == "/content/diffusion_jax"
    assert not any("[tpu]" in arg for arg in command)
    assert command[7:] == [
        f"jax=={importlib.metadata.version('jax')}",
        f"jaxlib=={importlib.metadata.version('jaxlib')}",
    ]


@pytest.mark.parametrize(
    "installed, module, expected",
    [
        ({"libtpu": "0.0.21"}, False, "libtpu 0.0.21"),
        ({"libtpu-nightly": "0.1.dev20241010"}, False, "libtpu-nightly 0.1.dev20241010"),
        ({}, True, "libtpu"),  # importable, without distribution metadata
        ({}, False, None),
    ],
)
def test_preinstalled_libtpu(installed, module, expected, monkeypatch):
    version, find_spec = importlib.metadata.version, importlib.util.find_spec

    def fake_version(name):
        if name in ("libtpu", "libtpu-nightly"):
            if name not in installed:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[name]
        return version(name)

    def fake_find_spec(name, *args):
        if name == "libtpu":
            return object() if module else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert install_cell_functions()["preinstalled_libtpu"]() == expected


def test_notebook_names_its_runtime():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    intro = nb.cells[0].source
    assert "TPU v5e-1" in intro and "1 device" in intro and "divisible" in intro


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 8])
def test_notebook_runs_on_cpu(tmp_path, monkeypatch, num_devices):
    """The whole notebook on a CPU runtime: one device, as Colab's v5e-1 has, and 8, as a
    TPU VM has (training splits the EMA over them; the sampler takes it whole)."""
    released = tmp_path / "ddpm-cifar10-32"
    write_diffusers(
        released, DIFFUSERS_CONFIG, random_state_dict(diffusers_shapes(DIFFUSERS_CONFIG))
    )
    workdir = tmp_path / "run"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source += tiny_parameters(workdir, released)

    # The kernel inherits this environment: `num_devices` CPU devices, and the checkout
    # importable, so the install cell must skip the install.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = f"--xla_force_host_platform_device_count={num_devices}" if num_devices > 1 else ""
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"notebook executed in {elapsed:.1f} s")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "skipping the install" in text
    assert f"{num_devices} device(s), platform cpu" in text and "no TPU found" in text
    assert "step 20/20" in text
    assert "Imported " in text and "parameters" in text
    images = [
        base64.b64decode(o.data["image/png"])
        for o in outputs
        if o.output_type == "display_data" and "image/png" in o.data
    ]
    assert len(images) == 3  # sample grid, progressive strip, released-model samples
    assert all(img.startswith(PNG_MAGIC) for img in images)
    for name in ("samples_step20.png", "progressive_step20.png", "released_samples.png"):
        assert (workdir / "notebook" / name).read_bytes().startswith(PNG_MAGIC)
    assert (workdir / "checkpoints").is_dir()
