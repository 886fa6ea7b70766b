"""The optional C helper of ``sepsnet-pq`` (``_pq_native.c``, built by ``pip install``), or None.

``NATIVE`` is the extension module when it was built and ``SEPSNET_PQ_NATIVE`` is not ``0``; the
callers read it at call time, so setting it to None (tests, or the environment variable) selects
the NumPy / OpenCV path, which gives the same numbers.
"""
from __future__ import annotations

import os
from types import ModuleType


def load_native() -> ModuleType | None:
    if os.environ.get("SEPSNET_PQ_NATIVE", "1").strip() == "0":
        return None
    try:
        from sepsnet.eval import _pq_native
    except ImportError:
        return None
    return _pq_native


NATIVE = load_native()
