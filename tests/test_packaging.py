"""pyproject.toml declares every third-party package the code imports: the imports of the
package and configs against `dependencies`, those of the tests against `dependencies` and the
test extra, each import mapped to the distribution that installs it by the installed
packages' own records (`importlib.metadata.packages_distributions`)."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FIRST_PARTY = {"diffusion_jax", "configs", "__future__"}
# Distributions that come in through a declared extra of another: libtpu through `jax[tpu]`.
THROUGH_EXTRA = {"libtpu": "jax[tpu]"}


def _name(requirement: str) -> str:
    """'etils[epath]>=1; ...' -> 'etils' (PEP 503 normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def declared(*extras: str) -> set[str]:
    requirements = list(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        requirements += PYPROJECT["project"]["optional-dependencies"][extra]
    names = {_name(r) for r in requirements}
    names |= {_name(d) for d, via in THROUGH_EXTRA.items() if any(via in r for r in requirements)}
    return names


def imported_modules(folder: Path) -> dict[str, str]:
    """{top-level module: a file importing it} of the third-party imports under `folder`."""
    local = {p.stem for p in folder.rglob("*.py")}
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY | local:
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def undeclared(folder: str, *extras: str) -> list[str]:
    installed = importlib.metadata.packages_distributions()
    allowed = declared(*extras)
    missing = []
    for module, where in sorted(imported_modules(REPO / folder).items()):
        distributions = {_name(d) for d in installed.get(module, [])}
        assert distributions, f"{where} imports {module}, which no installed package provides"
        if not distributions & allowed:
            missing.append(f"{where}: {module} ({', '.join(sorted(distributions))})")
    return missing


@pytest.mark.parametrize("folder, extras", [("diffusion_jax", ("tpu", "cuda")), ("configs", ())])
def test_the_package_imports_only_declared_dependencies(folder, extras):
    assert undeclared(folder, *extras) == []


def test_the_tests_import_only_declared_dependencies_and_test_extras():
    assert undeclared("tests", "test") == []


def test_an_undeclared_import_is_found(monkeypatch):
    """The check itself: with etils removed from the dependencies, the package's epath
    imports are reported."""
    project = dict(PYPROJECT["project"])
    project["dependencies"] = [r for r in project["dependencies"] if _name(r) != "etils"]
    monkeypatch.setitem(PYPROJECT, "project", project)
    assert any("etils" in line for line in undeclared("diffusion_jax"))
