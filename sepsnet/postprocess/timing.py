"""Stage timing, opt-in (issue 13): one name per stage from the pipeline to the predictor and
``sepsnet-bench``.

Disabled (the default) it records nothing and never synchronises a device, so CUDA frames run
without host syncs between stages. Enabled on CUDA it synchronises at each stage end, which is
what makes a stage's wall time mean the stage's compute (and costs the overlap).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: the post-processing stages of :func:`sepsnet.postprocess.pipeline.panoptic_inference`
PIPELINE_STAGES = ("candidates", "instances", "scoring", "paste", "dedup", "stuff", "fusion")
#: every stage of a predictor frame, in order; ``total`` is the frame's wall time
FRAME_STAGES = ("preprocess", "dense", *PIPELINE_STAGES)


class StageTimer:
    """``with timer.stage("paste"): ...`` accumulates seconds per stage name when enabled."""

    def __init__(self, enabled: bool = False, device: torch.device | str | None = None) -> None:
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def start(self) -> None:
        """Mark the start of a timed span that ends in a stage (sync queued work first)."""
        if self.enabled:
            self._sync()

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)
