"""Training metrics: ``OUT/metrics.jsonl`` (one JSON object per logged iteration) and
TensorBoard scalars in ``OUT/tb``, written by the main process only."""
from __future__ import annotations

import json
from pathlib import Path

from sepsnet.fileio import atomic_write_text


def trim_metrics(path: str | Path, last_iteration: int) -> int:
    """Drop the lines of a metrics JSON-lines file whose ``iteration`` is past
    ``last_iteration`` (left by a run that crashed after its last checkpoint), rewriting the
    file atomically. Unparseable lines (a torn last write) are dropped too. Returns the
    number of lines removed; a missing file is left alone."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():  # a torn write may be binary
        try:
            record = json.loads(line)
            keep = int(record["iteration"]) <= last_iteration
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


class MetricsLog:
    """JSON-lines metrics file + optional TensorBoard writer (main process only).

    ``purge_step`` (on resume: resumed iteration + 1) makes TensorBoard hide the events a
    crashed run wrote past the checkpoint it resumes from.
    """

    def __init__(self, out_dir: Path, enabled: bool, purge_step: int | None = None) -> None:
        self.enabled = enabled
        self.tb = None
        self.path = out_dir / "metrics.jsonl"
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge_step)
            except Exception:  # tensorboard missing or broken: keep the JSON log
                self.tb = None

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
