"""The repository root as the tools find it (runtime/paths.py)."""

import pathlib
import subprocess
import sys

from diffusion_jax.runtime import paths
from diffusion_jax.tools.benchmark import __main__ as benchmark_main

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_repository_root_holds_the_configs_and_launch_scripts():
    assert paths.REPO_ROOT == REPO
    assert benchmark_main.DEFAULT_CONFIG == REPO / "configs" / "cifar10.py"
    assert benchmark_main.DEFAULT_CONFIG.exists() and (REPO / "launch").is_dir()


def test_a_config_file_loads_from_any_working_directory(tmp_path):
    """Config files import `configs.base`: the tools that load one (convert, aot, main) make
    the root importable, from a folder where `configs` is not (the package is reached
    through a link, as an installed copy would be)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "diffusion_jax").symlink_to(REPO / "diffusion_jax")
    code = (
        "from diffusion_jax.tools.convert import imported; "
        f"print(imported.load_config_file({str(REPO / 'configs' / 'digits.py')!r}).data.name)"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "digits"
