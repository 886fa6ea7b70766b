"""A toy model and dataset that drive :class:`sepsnet.train.trainer.Trainer` in milliseconds
(used by the trainer-loop tests and by the DDP worker ``_ddp_worker.py``)."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import Dataset

from sepsnet.config import SEPSNetConfig


class ToyModel(torch.nn.Module):
    """``loss_a``: squared error times ``scale``; ``loss_b``: NaN from forward call
    ``nan_at`` on (1-based), else a small regulariser. Records every forward's start time
    and local loss values."""

    def __init__(self, scale: float = 1.0, nan_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.scale = scale
        self.nan_at = nan_at
        self.calls = 0
        self.forward_times: list[float] = []
        self.local_losses: list[dict[str, float]] = []

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.forward_times.append(time.time())
        y = torch.stack([t["y"] for t in targets]).to(images.dtype)
        loss_a = self.scale * ((self.lin(images).squeeze(1) - y) ** 2).mean()
        loss_b = 0.01 * self.lin.weight.abs().sum()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss_b = loss_b * float("nan")
        self.local_losses.append({"loss_a": loss_a.item(), "loss_b": loss_b.item()})
        return {"loss_a": loss_a, "loss_b": loss_b}


class ToyData(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, generator=g) * 10

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def toy_collate(items: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    return torch.stack([it["x"] for it in items]), [{"y": it["y"]} for it in items]


def toy_config(**solver: Any) -> SEPSNetConfig:
    cfg = SEPSNetConfig()
    cfg.data.num_workers = 0
    s = cfg.solver
    s.lr, s.warmup_iters, s.steps, s.max_iter, s.batch_size = 0.01, 0, [], 4, 2
    s.checkpoint_period, s.log_period, s.amp = 0, 1, False
    for k, v in solver.items():
        setattr(s, k, v)
    return cfg
