"""The launch kit (launch/): shell scripts pass `bash -n` and shellcheck, fail fast with a clear
message when a Google Cloud setting is missing, and print the right gcloud commands in
--dry-run. A stub `gcloud` on PATH stands in for the Google Cloud CLI, so nothing here needs an
account or the network. The scheduled-evaluation files (systemd, cron, Kubernetes) are parsed
and checked for the evaluation command."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
EXECUTABLES = [p for p in SCRIPTS if p.name != "common.sh"]
EVAL_COMMAND = "--mode eval --config.eval.once=True"

# Answers `gcloud config get-value` from FAKE_* variables, fails `storage ls` for the bucket
# named missing-bucket, and logs every call (one line each) to $FAKE_GCLOUD_LOG.
FAKE_GCLOUD = """#!/bin/sh
echo "gcloud $*" >> "$FAKE_GCLOUD_LOG"
case "$*" in
  "config get-value project") echo "${FAKE_PROJECT:-(unset)}" ;;
  "config get-value compute/zone") echo "${FAKE_ZONE:-(unset)}" ;;
  "config get-value account") echo "someone@example.com" ;;
  "storage ls gs://missing-bucket") echo "ERROR: bucket not found" >&2; exit 1 ;;
esac
exit 0
"""

# Settings the scripts read; removed from the environment of every test run.
SETTINGS = (
    "PROJECT ZONE BUCKET TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION PYTHON_VERSION CONFIG RUN "
    "WORKDIR REPO_URL REPO_REF SPOT SERVICE_ACCOUNT SOURCE PYTHON LOCK_FILE DRY_RUN REPO VENV LOG "
    "PIDFILE JAX_COORDINATOR_PORT"
).split()


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    assert found, "shellcheck not found: install the test extra (pip install -e '.[test]')"
    return found


@pytest.fixture
def env(tmp_path):
    """An environment with a stub gcloud first on PATH and none of the scripts' settings."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    base.update(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"),
        TMPDIR=str(tmp_path),
    )
    return base


def gcloud_calls(env) -> list[str]:
    log = Path(env["FAKE_GCLOUD_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def run(script: str, *args: str, env, cwd=ROOT, **settings) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**env, **settings},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def commands(stdout: str) -> list[str]:
    """The commands a script printed (lines starting with '+ ')."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------------------------
# Static checks


def test_launch_kit_files_exist():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "tpu_vm.sh", "tpu_pod.sh", "eval_once.sh", "reproduce_cifar10.sh"} <= names
    for p in EXECUTABLES:
        text = p.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), p
        assert "set -euo pipefail" in text, p
        assert os.access(p, os.X_OK), f"{p} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck():
    result = subprocess.run(
        [shellcheck_binary(), "-x", *(str(p.relative_to(ROOT)) for p in SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script", [p for p in EXECUTABLES if not p.name.startswith("remote_")], ids=lambda p: p.name
)
def test_help(script, env):
    result = run(script.name, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert gcloud_calls(env) == []


# ---------------------------------------------------------------------------------------------
# Fail fast: nothing is created when a setting is missing (run without --dry-run on purpose).

GOOD = dict(PROJECT="my-project", ZONE="europe-west4-a", BUCKET="my-bucket")


@pytest.mark.parametrize("script", ["tpu_vm.sh", "tpu_pod.sh"])
@pytest.mark.parametrize(
    "missing, message",
    [
        ("PROJECT", "no Google Cloud project: set PROJECT="),
        ("ZONE", "no zone: set ZONE to a zone"),
        ("BUCKET", "BUCKET is not set"),
    ],
)
def test_tpu_scripts_fail_fast_on_missing_setting(script, missing, message, env):
    settings = {k: v for k, v in GOOD.items() if k != missing}
    result = run(script, env=env, **settings)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    calls = gcloud_calls(env)
    assert not any("tpu-vm" in c for c in calls), calls  # nothing created, copied or started
    if missing in ("PROJECT", "ZONE"):  # the gcloud default was consulted first
        key = "project" if missing == "PROJECT" else "compute/zone"
        assert f"gcloud config get-value {key}" in calls


def test_tpu_vm_fails_fast_on_inaccessible_bucket(env):
    result = run("tpu_vm.sh", env=env, **{**GOOD, "BUCKET": "gs://missing-bucket"})
    assert result.returncode != 0
    assert "cannot list gs://missing-bucket" in result.stderr
    assert not any("tpu-vm" in c for c in gcloud_calls(env))


def test_tpu_vm_rejects_local_workdir_and_unknown_step(env):
    result = run("tpu_vm.sh", "--dry-run", env=env, **GOOD, WORKDIR="/tmp/run")
    assert result.returncode != 0 and "must be a gs:// path" in result.stderr
    result = run("tpu_vm.sh", "--dry-run", "launch", env=env, **GOOD)
    assert result.returncode != 0 and "unknown step 'launch'" in result.stderr
    result = run("tpu_vm.sh", "--dryrun", env=env, **GOOD)
    assert result.returncode != 0 and "unknown option '--dryrun'" in result.stderr


def test_eval_once_fails_fast_without_bucket(env):
    result = run("eval_once.sh", env=env)
    assert result.returncode != 0
    assert "BUCKET is not set" in result.stderr


def test_reproduce_fails_fast_without_download(env, tmp_path):
    result = run("reproduce_cifar10.sh", env=env, SOURCE=str(tmp_path / "nothing"))
    assert result.returncode != 0
    assert "huggingface-cli download google/ddpm-cifar10-32" in result.stderr
    (tmp_path / "empty").mkdir()
    result = run("reproduce_cifar10.sh", env=env, SOURCE=str(tmp_path / "empty"))
    assert result.returncode != 0 and "no config.json" in result.stderr


# ---------------------------------------------------------------------------------------------
# --dry-run prints the plan and the commands, and runs none of them.


def test_tpu_vm_dry_run(env, tmp_path):
    result = run(
        "tpu_vm.sh", "--dry-run", "--", "--config.training.batch_size=256", env=env, **GOOD
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Plan: create install train on TPU VM 'diffusion-jax-v3-8' (v3-8)")
    assert "dry run" in out
    create, tar, scp, install, train = commands(out)
    assert create.startswith("gcloud compute tpus tpu-vm create diffusion-jax-v3-8 ")
    for flag in (
        "--project=my-project",
        "--zone=europe-west4-a",
        "--accelerator-type=v3-8",
        "--version=tpu-ubuntu2204-base",
    ):
        assert flag in create
    assert tar.startswith("tar ")
    assert scp.startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in scp
    assert install.startswith("gcloud compute tpus tpu-vm ssh diffusion-jax-v3-8 ")
    assert "--worker=all" in install and "launch/remote_setup.sh" in install
    assert "PYTHON_VERSION=3.12 bash ~/diffusion_jax/launch/remote_setup.sh" in install
    assert "\n  PYTHON_VERSION     3.12\n" in out  # the plan shows the workers' Python
    assert "warning:" not in out  # europe-west4-a offers v3-8
    assert train.startswith("gcloud compute tpus tpu-vm ssh diffusion-jax-v3-8 ")
    assert "--worker=all" in train
    assert (
        "launch/remote_train.sh configs/cifar10.py gs://my-bucket/cifar10 "
        "--config.training.batch_size=256" in train
    )
    # Only read-only checks reached gcloud; the tarball was not even made.
    assert all(c.startswith(("gcloud config", "gcloud storage ls")) for c in gcloud_calls(env))
    assert "gcloud storage ls gs://my-bucket" in gcloud_calls(env)
    assert not (tmp_path / "diffusion_jax_checkout.tar.gz").exists()


def test_tpu_pod_dry_run_uses_gcloud_defaults_and_clones(env):
    env = {**env, "FAKE_PROJECT": "default-project", "FAKE_ZONE": "europe-west4-a"}
    result = run(
        "tpu_pod.sh",
        "--dry-run",
        env=env,
        BUCKET="gs://my-bucket",
        RUN="pod-run",
        REPO_URL="https://github.com/OWNER/diffusion_jax",
        REPO_REF="main",
    )
    assert result.returncode == 0, result.stderr
    create, install, train = commands(result.stdout)
    assert "tpu-vm create diffusion-jax-v3-32 " in create
    assert "--accelerator-type=v3-32" in create
    assert "--project=default-project --zone=europe-west4-a" in create
    assert "warning:" not in result.stdout
    assert "git clone --depth 1 --branch main https://github.com/OWNER/diffusion_jax" in install
    assert "--worker=all" in install and "--worker=all" in train
    assert "gs://my-bucket/pod-run" in train


def test_tpu_vm_python_version_setting(env):
    """PYTHON_VERSION reaches remote_setup.sh on the workers, and the plan shows it."""
    result = run("tpu_vm.sh", "--dry-run", "install", env=env, **GOOD, PYTHON_VERSION="3.13")
    assert result.returncode == 0, result.stderr
    assert "\n  PYTHON_VERSION     3.13\n" in result.stdout
    *_, install = commands(result.stdout)
    assert "PYTHON_VERSION=3.13 bash ~/diffusion_jax/launch/remote_setup.sh" in install
    result = run("tpu_vm.sh", "--dry-run", env=env, **GOOD, PYTHON_VERSION="python3.11")
    assert result.returncode != 0
    assert "PYTHON_VERSION=python3.11 is not a CPython version" in result.stderr


# Zones by accelerator type: TPU v3 pod slices (v3-32 and up) exist only in europe-west4-a; a
# v3-8 is also offered in us-central1.
@pytest.mark.parametrize(
    "script, accelerator, offered, not_offered",
    [
        ("tpu_pod.sh", None, ["europe-west4-a"], ["us-central1"]),
        ("tpu_vm.sh", "v3-128", ["europe-west4-a"], ["us-central1"]),
        ("tpu_vm.sh", None, ["us-central1-a", "us-central1-b", "europe-west4-a"], []),
        ("tpu_vm.sh", "v4-32", ["us-central2-b"], ["europe-west4"]),
    ],
)
def test_missing_zone_names_the_zones_of_the_accelerator(
    script, accelerator, offered, not_offered, env
):
    settings = {k: v for k, v in GOOD.items() if k != "ZONE"}
    if accelerator:
        settings["ACCELERATOR_TYPE"] = accelerator
    result = run(script, "--dry-run", env=env, **settings)
    assert result.returncode != 0
    (message,) = result.stderr.splitlines()
    assert message.startswith("error: no zone: set ZONE to a zone that offers ")
    for zone in offered:
        assert zone in message
    for zone in not_offered:
        assert zone not in message
    assert "https://cloud.google.com/tpu/docs/regions-zones" in message


@pytest.mark.parametrize(
    "script, zone, warned",
    [
        ("tpu_pod.sh", "us-central1-a", True),  # v3-32: Europe only
        ("tpu_pod.sh", "europe-west4-a", False),
        ("tpu_vm.sh", "us-central1-a", False),  # v3-8
        ("tpu_vm.sh", "us-central1-b", False),
        ("tpu_vm.sh", "asia-east1-c", True),
    ],
)
def test_dry_run_warns_of_a_zone_without_the_accelerator(script, zone, warned, env):
    result = run(script, "--dry-run", "create", env=env, **{**GOOD, "ZONE": zone})
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    if warned:
        (warning,) = warnings
        assert f"ZONE={zone} is not among the zones that offer v3-" in warning
        assert "europe-west4-a" in warning
    else:
        assert warnings == []
    (create,) = commands(result.stdout)  # a warning only: the plan still runs
    assert f"--zone={zone}" in create


def test_unlisted_accelerator_gets_no_zone_warning(env):
    result = run("tpu_vm.sh", "--dry-run", "create", env=env, **GOOD, ACCELERATOR_TYPE="v9-8")
    assert result.returncode == 0, result.stderr
    assert "warning:" not in result.stdout


def test_tpu_vm_single_steps(env):
    result = run("tpu_vm.sh", "--dry-run", "logs", "stop", "delete", env=env, **GOOD)
    assert result.returncode == 0, result.stderr
    logs, stop, delete = commands(result.stdout)
    assert "--worker=0" in logs and "diffusion_jax_train.log" in logs
    assert "--worker=all" in stop and "remote_train.sh --stop" in stop
    assert delete.startswith("gcloud compute tpus tpu-vm delete diffusion-jax-v3-8 ")


def test_tpu_vm_train_runs_gcloud(env):
    """Without --dry-run the commands reach gcloud (here the stub) with the same arguments."""
    result = run("tpu_vm.sh", "train", env=env, **GOOD)
    assert result.returncode == 0, result.stderr
    ssh = [c for c in gcloud_calls(env) if "tpu-vm ssh" in c]
    assert len(ssh) == 1
    assert "--worker=all" in ssh[0]
    assert "remote_train.sh configs/cifar10.py gs://my-bucket/cifar10" in ssh[0]


def test_eval_once_dry_run(env):
    result = run("eval_once.sh", "--dry-run", env=env, BUCKET="my-bucket", RUN="cifar10")
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert (
        "-m diffusion_jax.main --config configs/cifar10.py --workdir gs://my-bucket/cifar10 "
        + EVAL_COMMAND
        in cmd
    )


def test_reproduce_dry_run(env, tmp_path):
    source = tmp_path / "ddpm-cifar10-32"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    workdir = tmp_path / "imported"
    result = run(
        "reproduce_cifar10.sh",
        "--dry-run",
        "--",
        "--config.evals.fid.num_samples=5000",
        env=env,
        SOURCE=str(source),
        WORKDIR=str(workdir),
    )
    assert result.returncode == 0, result.stderr
    convert, evaluate = commands(result.stdout)
    assert (
        f"-m diffusion_jax.tools.convert --source {source} --workdir {workdir} "
        "--config configs/cifar10.py" in convert
    )
    assert f"--workdir {workdir} {EVAL_COMMAND} --config.evals.fid.num_samples=5000" in evaluate
    assert "FID 3.17" in result.stdout
    assert not workdir.exists()
    # A workdir imported before is evaluated again without a new conversion.
    (workdir / "checkpoints" / "0").mkdir(parents=True)
    result = run(
        "reproduce_cifar10.sh", "--dry-run", env=env, SOURCE=str(source), WORKDIR=str(workdir)
    )
    assert result.returncode == 0, result.stderr
    (evaluate,) = commands(result.stdout)
    assert EVAL_COMMAND in evaluate and "skipping the conversion" in result.stdout


# ---------------------------------------------------------------------------------------------
# remote_setup.sh: a uv-managed CPython (Ubuntu 22.04 has no python3.12; its python3.11 is a
# release candidate), its version a setting.

FAKE_VENV_PYTHON = """#!/bin/sh
echo {version}
"""


def _remote_setup(env, tmp_path, *args, venv_python=None, **settings):
    venv = tmp_path / "venv"
    if venv_python:
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").write_text(FAKE_VENV_PYTHON.format(version=venv_python))
        (venv / "bin" / "python").chmod(0o755)
    return run(
        "remote_setup.sh", "--dry-run", *args, env=env, REPO=str(ROOT), VENV=str(venv), **settings
    )


@pytest.mark.parametrize("version", [None, "3.13", "3.12.11"])
def test_remote_setup_dry_run(env, tmp_path, version):
    settings = {"PYTHON_VERSION": version} if version else {}
    result = _remote_setup(env, tmp_path, **settings)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    expected = version or "3.12"
    assert out.startswith(f"Plan: install {ROOT} with its TPU extra into {tmp_path / 'venv'}")
    assert f"(CPython {expected} from uv)" in out and "dry run" in out
    assert f"\n  PYTHON_VERSION     {expected}\n" in out
    cmds = commands(out)
    assert "python3 -m pip install --user -q --upgrade uv" in cmds
    (venv,) = [c for c in cmds if " venv " in c]
    assert venv == (
        f"python3 -m uv venv --clear --seed --python {expected} --managed-python "
        f"{tmp_path / 'venv'}"
    )
    (install,) = [c for c in cmds if " pip install --python " in c]
    assert install.endswith(f"-e '{ROOT}[tpu]'")
    assert f"--python {tmp_path / 'venv'}/bin/python" in install
    # Never the system's Python packages: no apt python3.11 (3.11.0~rc1 on 22.04), no venv module.
    assert not any("python3.11" in c or "-m venv" in c for c in cmds), cmds
    assert not (tmp_path / "venv").exists()  # a dry run


def test_remote_setup_keeps_a_venv_with_the_right_python(env, tmp_path):
    result = _remote_setup(env, tmp_path, venv_python="3.12.11")
    assert result.returncode == 0, result.stderr
    assert "has Python 3.12.11; keeping it" in result.stdout
    assert not any(" venv " in c for c in commands(result.stdout))
    assert any(" pip install --python " in c for c in commands(result.stdout))


def test_remote_setup_remakes_a_venv_with_another_python(env, tmp_path):
    result = _remote_setup(env, tmp_path, venv_python="3.11.0rc1")
    assert result.returncode == 0, result.stderr
    assert "has Python 3.11.0rc1, not 3.12: making it anew" in result.stdout
    (venv,) = [c for c in commands(result.stdout) if " venv " in c]
    assert "--clear" in venv and "--python 3.12 " in venv


def test_remote_setup_rejects_bad_settings(env, tmp_path):
    result = _remote_setup(env, tmp_path, PYTHON_VERSION="python3.12")
    assert result.returncode != 0
    assert "PYTHON_VERSION=python3.12 is not a CPython version" in result.stderr
    result = run("remote_setup.sh", "--dry-run", env=env, REPO=str(tmp_path / "none"))
    assert result.returncode != 0 and "no checkout at" in result.stderr
    result = _remote_setup(env, tmp_path, "extra")
    assert result.returncode != 0 and "takes no arguments" in result.stderr


# ---------------------------------------------------------------------------------------------
# pyproject.toml: the tpu extra pins a tested range of jax.


def test_tpu_extra_pins_a_tested_jax_range():
    version = pytest.importorskip("packaging.version")
    requirements = pytest.importorskip("packaging.requirements")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (tpu,) = pyproject["project"]["optional-dependencies"]["tpu"]
    req = requirements.Requirement(tpu)
    assert req.name == "jax" and req.extras == {"tpu"}
    uppers = [s for s in req.specifier if s.operator in ("<", "<=", "~=", "==")]
    lowers = [s for s in req.specifier if s.operator in (">", ">=", "~=", "==")]
    assert uppers, f"{tpu!r} has no upper bound"
    # jax[tpu] < 0.5.1 also needs libtpu-nightly, which is not on PyPI (-f libtpu_releases.html).
    assert lowers and not req.specifier.contains("0.5.0"), f"{tpu!r}: lower bound below 0.5.1"
    import jax

    assert req.specifier.contains(version.Version(jax.__version__).base_version), (
        f"the tests run on jax {jax.__version__}, outside the tpu extra's {tpu!r}: "
        "move the pin (docs/tpu.md) once the tests pass with it"
    )


# ---------------------------------------------------------------------------------------------
# remote_train.sh, run here with a stub interpreter and a stub metadata server (curl).

FAKE_PYTHON = """#!/bin/sh
env | grep -E '^JAX_(COORDINATOR_ADDRESS|NUM_PROCESSES|PROCESS_ID)=' | sort > "$FAKE_OUT.env"
echo "$@" > "$FAKE_OUT.args"
exec sleep 30
"""

FAKE_CURL = """#!/bin/sh
for last; do :; done
case "$last" in
  */worker-network-endpoints) echo "w-0:0:10.1.0.5,w-1:1:10.1.0.6,w-2:2:10.1.0.7,w-3:3:10.1.0.8" ;;
  */agent-worker-number) echo 2 ;;
  *) exit 22 ;;
esac
"""


def _wait_for(path: Path, seconds: float = 10.0) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("pod", [False, True], ids=["single-host", "pod"])
def test_remote_train_starts_and_stops(env, tmp_path, pod):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    curl = bin_dir / "curl"
    curl.write_text(FAKE_CURL if pod else "#!/bin/sh\nexit 7\n")
    curl.chmod(0o755)
    settings = dict(
        REPO=str(ROOT),
        VENV=str(tmp_path / "venv"),
        LOG=str(tmp_path / "train.log"),
        PIDFILE=str(tmp_path / "train.pid"),
        FAKE_OUT=str(tmp_path / "out"),
    )
    result = run(
        "remote_train.sh", "configs/digits.py", "gs://b/run", "--config.seed=3", env=env, **settings
    )
    assert result.returncode == 0, result.stderr
    assert "training started" in result.stdout
    args = _wait_for(tmp_path / "out.args")
    assert args.split() == [
        "-m",
        "diffusion_jax.main",
        "--config",
        "configs/digits.py",
        "--workdir",
        "gs://b/run",
        "--config.seed=3",
    ]
    jax_env = _wait_for(tmp_path / "out.env") if pod else ""
    if pod:
        assert jax_env.split() == [
            "JAX_COORDINATOR_ADDRESS=10.1.0.5:8476",
            "JAX_NUM_PROCESSES=4",
            "JAX_PROCESS_ID=2",
        ]
    else:
        time.sleep(0.1)
        assert (tmp_path / "out.env").read_text() == ""
    pid = int((tmp_path / "train.pid").read_text())
    again = run("remote_train.sh", "configs/digits.py", "gs://b/run", env=env, **settings)
    assert again.returncode != 0 and "already runs" in again.stderr
    stop = run("remote_train.sh", "--stop", env=env, **settings)
    assert stop.returncode == 0 and f"SIGTERM to training (pid {pid})" in stop.stdout
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "training process survived --stop"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as stopped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


# ---------------------------------------------------------------------------------------------
# Scheduled evaluation recipes


def test_k8s_cronjob():
    doc = yaml.safe_load((LAUNCH / "k8s" / "eval-cronjob.yaml").read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert container["image"]
    cmd = " ".join(container["command"] + container["args"])
    assert cmd.startswith("python -m diffusion_jax.main --config configs/")
    assert "--workdir gs://" in cmd
    assert cmd.endswith(EVAL_COMMAND)


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_systemd_units():
    service = _unit(LAUNCH / "systemd" / "diffusion-jax-eval.service")
    timer = _unit(LAUNCH / "systemd" / "diffusion-jax-eval.timer")
    exec_start = service["Service"]["ExecStart"]
    assert "-m diffusion_jax.main --config ${CONFIG} --workdir ${WORKDIR}" in exec_start
    assert exec_start.endswith(EVAL_COMMAND)
    assert service["Service"]["Type"] == "oneshot"
    assert timer["Timer"]["Unit"] == "diffusion-jax-eval.service"
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    # The environment file example defines what ExecStart uses.
    example = (LAUNCH / "systemd" / "eval.env.example").read_text()
    assert "\nCONFIG=configs/" in example and "\nWORKDIR=gs://" in example


def test_cron_entry():
    text = (LAUNCH / "cron" / "diffusion-jax-eval.cron").read_text()
    jobs = [
        line
        for line in text.splitlines()
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    assert len(fields) == 7  # minute hour day month weekday user command (/etc/cron.d format)
    assert "launch/eval_once.sh" in fields[6] and "WORKDIR=gs://" in fields[6]
    assert EVAL_COMMAND in text  # documented: what eval_once.sh runs
    assert EVAL_COMMAND in (LAUNCH / "eval_once.sh").read_text()
