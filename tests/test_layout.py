"""The package's layout: folders by role, imports going one way (down), no two modules of one
base name, no module over ~500 lines without the reason in its docstring.

The import graph is read from the source with `ast` (every `import` and `from ... import`,
also those inside functions), so a lazy import cannot hide an upward one.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_jax"

# Roles from the bottom up: a module may import its own role and the roles below it.
ROLES = (
    "runtime",  # errors, files, logs, random streams, devices, caches, pictures on disk
    "input_pipeline",  # datasets and deterministic batches
    "diffusion",  # the math: the noise process, losses, likelihoods, timestep sampling
    "models",  # the networks
    "sampling",  # samplers over the noise process, sharded generation
    "metrics",  # sample-quality metrics
    "training",  # train state, step, checkpoints, tasks, the loop
    "evaluation",  # evaluators and the eval / sample jobs
    "tools",  # aot, benchmark, convert
    "",  # the top: main.py
)
TOP_MODULES = {"__init__.py", "main.py"}
MAX_LINES = 500
COHESIVE = "one cohesive"  # what the docstring of a longer module says, with why


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _role(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else ""


def _imports(path: Path) -> set[str]:
    """Every diffusion_jax module or package `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "diffusion_jax"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion_jax"):
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _resolve(name: str, modules: set[str]) -> str:
    """The module `name` refers to (`pkg.module.symbol` -> `pkg.module`)."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(found: dict[str, Path]) -> list[str]:
    names = set(found)
    bad = []
    for module, path in found.items():
        for target in {_resolve(n, names) for n in _imports(path)} - {"diffusion_jax"}:
            if ROLES.index(_role(target)) > ROLES.index(_role(module)):
                bad.append(f"{module} ({_role(module)}) imports {target} ({_role(target)})")
    return sorted(bad)


def test_imports_go_down_the_roles():
    found = modules()
    assert {_role(m) for m in found} == set(ROLES)
    assert upward_imports(found) == []


def test_an_upward_import_is_found(tmp_path, monkeypatch):
    """The check itself: a lazy import of the training loop from the math is reported."""
    found = modules()
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from diffusion_jax.training import loop\n")
    found["diffusion_jax.diffusion.planted"] = planted
    assert upward_imports(found) == [
        "diffusion_jax.diffusion.planted (diffusion) imports diffusion_jax.training.loop (training)"
    ]


def test_the_package_root_holds_constants_only():
    """Every module may import `diffusion_jax` itself (its version and MODES), so its
    `__init__` imports nothing of the package."""
    assert _imports(PACKAGE / "__init__.py") == set()


def test_only_main_stays_at_the_top():
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py"}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top == TOP_MODULES
    assert folders == set(ROLES) - {""}


def test_no_two_modules_share_a_base_name():
    names: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.stem, []).append(str(path.relative_to(PACKAGE)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_only_runtime_paths_finds_files_from_its_own_location():
    """A module that walks up from its `__file__` breaks when it moves folder; the repository
    root has one source, `runtime.paths.REPO_ROOT`."""
    users = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "__file__" in p.read_text()
    }
    assert users == {"runtime/paths.py"}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_long_modules_say_why(path):
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert COHESIVE in doc.lower(), f"{path.name}: {lines} lines"


def test_the_readme_points_at_code_that_exists():
    """Each file (and folder) the README's paper table names exists, and each name quoted
    after a file is defined in it."""
    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("| Paper | Where")
    table = readme[start : readme.index("\n\n", start)]
    checked = 0
    for row in table.strip().splitlines()[2:]:
        path = None
        for quoted in re.findall(r"`([^`]+)`", re.split(r"(?<!\\)\|", row)[2]):
            if quoted.endswith((".py", "/")):
                path = PACKAGE / quoted
                assert path.exists(), quoted
                continue
            name = quoted.split("(")[0].split(".")[-1]
            if path is None or path.is_dir() or "=" in name:  # e.g. loss_type="mse"
                continue
            assert re.search(rf"^\s*(def|class) {name}\b", path.read_text(), re.M), (path, name)
            checked += 1
    assert checked > 20
