"""Metadata lives in pyproject.toml; this file adds the optional C helpers.

``sepsnet.eval._pq_native`` (PNG unfilter to ids, Boundary PQ bands, pair counts, for ``sepsnet-pq``) and
``sepsnet.postprocess._stuff_native`` (the stuff labels of the post-processing) are plain C on the CPython
API. Both are ``optional``: without a C compiler the install still succeeds and the NumPy/OpenCV paths
run (same results, slower)."""
import sys

from setuptools import Extension, setup

_FLAGS = [] if sys.platform == "win32" else ["-O3", "-std=c99"]

setup(ext_modules=[
    Extension("sepsnet.eval._pq_native", ["sepsnet/eval/_pq_native.c"], optional=True, extra_compile_args=_FLAGS),
    Extension("sepsnet.postprocess._stuff_native", ["sepsnet/postprocess/_stuff_native.c"], optional=True,
              extra_compile_args=_FLAGS),
])
