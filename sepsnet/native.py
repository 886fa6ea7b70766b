"""Optional C helpers (built by ``pip install -e .`` as optional setuptools Extensions): each is
used when it was built and its environment switch is not ``0``; otherwise callers run their
NumPy form, which gives the same results."""
from __future__ import annotations

import importlib
import os
from types import ModuleType


def optional_extension(module: str, switch: str) -> ModuleType | None:
    """The extension ``module`` (dotted name), or None when it was not built or ``$switch`` is ``0``."""
    if os.environ.get(switch, "1").strip() == "0":
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
