"""User errors end a command in one line and exit 1; anything else is a bug and keeps its
traceback; `--debug` (or DIFFUSION_JAX_DEBUG=1) shows the traceback of user errors too."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from diffusion_jax.runtime import errors


def test_reported_turns_only_user_errors_into_one_line(capsys, monkeypatch):
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as info, errors.reported():
        raise errors.ConfigError("config.model.ch=0 must be > 0")
    assert info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: config.model.ch=0 must be > 0"
    with pytest.raises(ValueError, match="a bug"), errors.reported():
        raise ValueError("a bug")  # not a UserError: propagates with its traceback
    with pytest.raises(errors.UserError), errors.reported(debug=True):
        raise errors.UserError("shown with its traceback")
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(errors.UserError), errors.reported():
        raise errors.UserError("shown with its traceback")


def main(*flags, prelude=""):
    """`python -m diffusion_jax.main` on the digits config in sample mode (after `prelude`, in
    the same interpreter); returns (return code, all output)."""
    code = f"{prelude}\nfrom absl import app\nfrom diffusion_jax import main\napp.run(main.main)"
    env = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    args = [sys.executable, "-c", code, "--config", str(REPO / "configs/digits.py")]
    args += ["--workdir=/nonexistent/workdir", "--mode=sample", *flags]
    proc = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_user_error_is_one_line_and_debug_shows_its_traceback():
    code, out = main("--config.sampling.guidance_scale=2.0")
    assert code == 1 and "Traceback" not in out, out
    (line,) = [line for line in out.splitlines() if line.strip()]
    assert line.startswith("error: config.sampling.guidance_scale=2.0 needs a class-conditional")
    code, out = main("--config.sampling.guidance_scale=2.0", "--debug")
    assert code == 1 and "Traceback" in out and "ConfigError" in out, out


def test_cli_bug_keeps_its_traceback():
    """A ValueError from the code (here injected into the config checks) is not a user error:
    its traceback and where it happened are shown."""
    prelude = (
        "from diffusion_jax.training import config_checks\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('operands could not be broadcast together')\n"
        "config_checks.validate_config = broken\n"
    )
    code, out = main(prelude=prelude)
    assert code != 0 and "Traceback" in out and "in broken" in out, out
    assert "error: operands" not in out
