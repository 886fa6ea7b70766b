"""One intra-op thread for stretches of small operations (issue 13)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_THREADS_LOCK = threading.Lock()
_one_thread_users = 0
_saved_threads = 0


@contextmanager
def one_intra_op_thread(device: torch.device) -> Iterator[None]:
    """Run a stretch of small operations with one intra-op thread on CPU (no-op elsewhere): with two
    threads on a busy machine each small parallel operation waits for the other thread (the 100
    per-box products of ``benchmarks/postprocess_speed.py``: 1.77 s against 0.13 s, same bits).
    Process-wide like ``torch.set_num_threads`` itself; nested or concurrent users share one
    save/restore (a count under a lock), so the original thread count always comes back."""
    global _one_thread_users, _saved_threads
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        if _one_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            if _saved_threads != 1:
                torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _one_thread_users -= 1
            if _one_thread_users == 0 and _saved_threads != 1:
                torch.set_num_threads(_saved_threads)
