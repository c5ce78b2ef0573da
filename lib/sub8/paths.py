"""Where the project's files live: committed inputs, generated runs, results."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository root: ``$SUB8_ROOT`` if set, else the checkout this package was installed from (editable)."""
    env = os.environ.get("SUB8_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd().resolve()
