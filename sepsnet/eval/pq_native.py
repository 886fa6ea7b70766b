"""The optional C helper of ``sepsnet-pq`` (``_pq_native.c``, built by ``pip install``), or None.

``NATIVE`` is the extension module when it was built and ``SEPSNET_PQ_NATIVE`` is not ``0``; the
callers read it at call time, so setting it to None (tests, or the environment variable) selects
the NumPy / OpenCV path, which gives the same numbers.
"""
from __future__ import annotations

import threading
from types import ModuleType

import numpy as np

from sepsnet.native import optional_extension


def load_native() -> ModuleType | None:
    """The C helper ``_pq_native`` when it was built and ``SEPSNET_PQ_NATIVE`` is not ``0``, else None."""
    return optional_extension("sepsnet.eval._pq_native", "SEPSNET_PQ_NATIVE")


NATIVE = load_native()


_scratch = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
    """A per-thread work array, reused from image to image while the size stays the same: full-image
    temporaries allocated afresh for every image cost page faults (kernel time) comparable to the
    work itself. Its content is undefined; the caller must not keep it."""
    arr = getattr(_scratch, name, None)
    if arr is None or arr.shape != shape or arr.dtype != dtype:
        arr = np.empty(shape, dtype)
        setattr(_scratch, name, arr)
    return arr
