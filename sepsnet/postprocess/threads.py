"""torch intra-op thread counts for stretches of post-processing (issue 13).

``torch.set_num_threads`` is process-wide, so every user here goes through one count under a lock:
the first entrant saves the process's setting and the last one out restores it, whatever the number
of threads calling at once; a nested block gives back the count it found."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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
