"""The plug-in strategies: every `strategies/*.py` (not starting with _), imported once so that each
registers itself in core/strategies.py's registry (docs/extending.md).

The plug-ins import core.strategies; core.strategies imports none of them, so there is no import cycle.
The modules that read the whole registry call `load_plugins()` before they do.
"""
from __future__ import annotations

import importlib
from pathlib import Path

PLUGIN_FOLDER = Path(__file__).resolve().parents[1] / "strategies"


def load_plugins(folder: Path = PLUGIN_FOLDER) -> list[str]:
    """Import every plug-in as `strategies.<name>` (already imported ones are not run again).

    The repo root is on sys.path wherever `core` itself is importable, so the package name resolves to
    the same module that a plug-in's thin script imports (registering it once).
    """
    names = [f"{folder.name}.{path.stem}" for path in sorted(folder.glob("*.py")) if not path.stem.startswith("_")]
    for name in names:
        importlib.import_module(name)
    return names
