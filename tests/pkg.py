"""Import this repository as a package, as ComfyUI does (relative imports intact, any folder name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
NAME = "run_telemetry_under_test"


def load() -> ModuleType:
    """The repository's ``__init__.py`` loaded as package ``run_telemetry_under_test`` (once)."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    spec = importlib.util.spec_from_file_location(NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module


def sub(name: str) -> ModuleType:
    """A submodule of the loaded package, e.g. ``sub("hooks.runtime")``."""
    load()
    return importlib.import_module(f"{NAME}.{name}")
