"""Where the repository's own files are: the config files (`configs/*.py`, which import
`configs.base`) and the launch scripts live beside the package, at the repository root."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_configs_importable() -> None:
    """Puts the repository root on `sys.path`, so that a config file loaded from any working
    directory can `import configs.base`."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
