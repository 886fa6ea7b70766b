"""Metadata lives in pyproject.toml; this file adds the optional C helper of ``sepsnet-pq``.

``sepsnet.eval._pq_native`` (PNG unfilter to ids, Boundary PQ bands, pair counts) is plain C on the
CPython API. It is ``optional``: without a C compiler the install still succeeds and ``sepsnet-pq``
runs its NumPy/OpenCV path (same numbers, slower)."""
import sys

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "sepsnet.eval._pq_native", ["sepsnet/eval/_pq_native.c"], optional=True,
    extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c99"],
)])
