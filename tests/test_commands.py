"""Every `python -m diffusion_jax...` command that README.md, BENCHMARKS.md, docs/ and
launch/ (the Colab notebook included) show a user: its module runs (`--help` exits 0), each
flag it passes is one the module defines, each config file it names exists, and each
`--config.a.b=...` override names a field of that config. The commands themselves are run
elsewhere (the quick start by CI, the launch scripts' dry runs in test_launch.py, the modes in
the tests of each module); this keeps the documentation from drifting from the code.
"""

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_jax.tools.benchmark import __main__ as benchmark_main
from diffusion_jax.tools.convert import imported

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (
    [REPO / "README.md", REPO / "BENCHMARKS.md"]
    + sorted((REPO / "docs").rglob("*.md"))
    + sorted(p for p in (REPO / "launch").rglob("*") if p.is_file())
)
COMMAND = re.compile(r"python3? -m (diffusion_jax[\w.]*\w)([^\n`)|;&#>]*)")
# Default config of the modules that have one when --config is not given.
DEFAULT_CONFIG = {
    "diffusion_jax.tools.benchmark": benchmark_main.DEFAULT_CONFIG.relative_to(REPO).as_posix()
}


def _text(path: Path) -> str:
    text = path.read_text(errors="ignore")
    if path.suffix == ".ipynb":
        text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
    return re.sub(r"\\\n\s*", " ", text)  # join continued lines


def commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, arguments) of every documented command."""
    found = []
    for path in DOCUMENTS:
        for m in COMMAND.finditer(_text(path)):
            try:
                args = shlex.split(m.group(2))
            except ValueError:  # an unbalanced quote in prose
                args = m.group(2).split()
            found.append((path.relative_to(REPO).as_posix(), m.group(1), args))
    return found


COMMANDS = commands()


def _help(module: str, flag: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, flag], capture_output=True, text=True, cwd=REPO, timeout=300
    )


@functools.cache
def defined_flags(module: str) -> frozenset[str]:
    """The flags `python -m module` defines, from its help (absl: the project's own
    sections of --helpfull; argparse: --help)."""
    out = _help(module, "--helpfull")
    if "--helpfull" not in out.stdout:  # argparse refuses it: its --help lists every flag
        out = _help(module, "--help")
        assert out.returncode == 0, out.stderr[-2000:]
        return frozenset(re.findall(r"(?m)^\s+(?:-\w, )?--([\w-]+)", out.stdout))
    assert out.returncode in (0, 1) and "flags:" in out.stdout, out.stderr[-2000:]  # absl: 1
    flags, ours = set(), False
    for line in out.stdout.splitlines():
        if re.match(r"^\S.*:$", line):  # a section: the module that defines the flags below
            ours = "diffusion_jax" in line
        elif ours:
            flags.update(re.findall(r"^\s+--(?:\[no\])?(\w+)", line))
    return frozenset(flags)


def test_the_documents_show_commands_of_every_entry_point():
    modules = {module for _, module, _ in COMMANDS}
    assert {
        "diffusion_jax.main",
        "diffusion_jax.tools.aot",
        "diffusion_jax.tools.benchmark",
        "diffusion_jax.tools.convert",
        "diffusion_jax.input_pipeline",
    } <= modules


@pytest.mark.parametrize("module", sorted({m for _, m, _ in COMMANDS}))
def test_each_documented_module_runs(module):
    assert defined_flags(module), module


def _placeholder(value: str) -> bool:
    return "$" in value or value.isupper() or value.split("/")[0].isupper()


@pytest.mark.parametrize(
    "where, module, args", COMMANDS, ids=[f"{w}:{m}:{i}" for i, (w, m, _) in enumerate(COMMANDS)]
)
def test_each_documented_command_passes_flags_its_module_defines(where, module, args):
    flags = defined_flags(module)
    config_file = DEFAULT_CONFIG.get(module)
    overrides = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            overrides.append(name.removeprefix("config."))
            continue
        name = name.removeprefix("no") if name.removeprefix("no") in flags else name
        assert name in flags, f"{where}: {module} has no flag --{name}"
        if name == "config":
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            if value and not _placeholder(value):
                assert (REPO / value).exists(), f"{where}: no config file {value}"
                config_file = value
    if overrides and config_file:
        config = imported.load_config_file(REPO / config_file)
        for field in overrides:
            node = config
            for key in field.split("."):
                assert key in node, f"{where}: {config_file} has no field config.{field}"
                node = node[key]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second():
    """README starts with a Quick start of exactly two commands in one bash block; CI's
    entry point runs the second (the whole suite) as it is written there; the README stays
    a newcomer's page (at most 350 lines; experiments live in BENCHMARKS.md and docs/)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quick start") :]
    start = section.index("```bash\n") + 8
    block = section[start : section.index("\n```", start)]
    lines = block.splitlines()
    assert len(lines) == 2 and lines[0].startswith("pip install -e . && python -m diffusion_jax")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines[1] in ci
    assert len(readme.splitlines()) <= 350
    assert "QS_" not in readme  # no placeholder left
