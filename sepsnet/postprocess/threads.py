"""torch intra-op thread counts for stretches of post-processing (issue 13).

``torch.set_num_threads`` is process-wide, so every user here goes through one count under a lock:
the first entrant saves the process's setting and the last one out restores it, whatever the number
of threads calling at once; a nested block gives back the count it found."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
_THREADS_LOCK = threading.Lock()
_users = 0
_saved_threads = 0


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch intra-op threads ``n`` inside the block (nothing changes for None); the process's own
    setting comes back when the last concurrent or nested block ends."""
    global _users, _saved_threads
    if n is None:
        yield
        return
    with _THREADS_LOCK:
        entry = torch.get_num_threads()
        if _users == 0:
            _saved_threads = entry
        _users += 1
        if entry != n:
            torch.set_num_threads(int(n))
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _users -= 1
            back = _saved_threads if _users == 0 else entry  # a nested block gives its caller's count back
            if torch.get_num_threads() != back:
                torch.set_num_threads(back)


@contextmanager
def one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run a stretch of small operations with one intra-op thread on CPU (no-op elsewhere): with two
    threads on a busy machine each small parallel operation waits for the other thread (the 100
    per-box products of ``benchmarks/postprocess_speed.py``: 1.77 s against 0.13 s, same bits)."""
    with intra_op_threads(1 if device.type == "cpu" else None):
        yield


_POOL_LOCK = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: it makes its own when it needs one."""
    global _pool, _POOL_LOCK
    _pool, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _pool_thread_start() -> None:
    """A pool thread runs torch (and MKL, whose thread count torch sets per thread: unset, a pool
    thread's products would start a team of their own) on one thread. It starts on the first
    submission, which callers make inside :func:`one_intra_op_thread`, so the count it sets is the
    process's count at that moment: from a thread other than the main one ``torch.set_num_threads``
    may also reach the main thread's OpenMP count, and that block restores it on exit."""
    torch.set_num_threads(1)


def host_workers(device: torch.device, work: int, per_worker: int) -> int:
    """How many host threads share ``work`` units of a CPU stage: the intra-op thread count the
    caller allows (torch's setting, e.g. ``predictor.postprocess_threads``), at most one per
    ``per_worker`` units and at most the machine's CPUs; 1 on other devices."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1, work // max(1, per_worker)))


def on_host_workers(fn: Callable[[T], None], parts: Sequence[T]) -> None:
    """``fn(part)`` for every part: the first on the calling thread, the others on a shared pool of
    host threads (for work that releases the GIL: OpenCV, NumPy, torch kernels); returns when all
    are done and re-raises the first error. Parts must not wait for each other. Callers run it
    inside :func:`one_intra_op_thread` (see :func:`_pool_thread_start`)."""
    global _pool
    if len(parts) <= 1:
        for part in parts:
            fn(part)
        return
    with _POOL_LOCK:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="sepsnet-host",
                                       initializer=_pool_thread_start)
        pool = _pool
    futures = [pool.submit(fn, part) for part in parts[1:]]
    try:
        fn(parts[0])
    finally:
        for f in futures:
            f.result()
