"""Learning-rate schedule of the paper (IV-A): warm-up, then x gamma at each step."""
from __future__ import annotations

from bisect import bisect_right

import torch

from sepsnet.config import SolverConfig


def lr_factor(iteration: int, solver: SolverConfig) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based).

    Warm-up for ``warmup_iters`` iterations: constant ``warmup_factor`` (paper: constant
    warm-up of 1k iterations) or linear from ``warmup_factor`` to 1; then the multi-step decay.
    """
    decay = solver.gamma ** bisect_right(solver.steps, iteration)
    if iteration >= solver.warmup_iters:
        return decay
    if solver.warmup_method == "constant":
        return solver.warmup_factor * decay
    alpha = iteration / max(solver.warmup_iters, 1)
    return (solver.warmup_factor * (1.0 - alpha) + alpha) * decay


def build_optimizer(model: torch.nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum; no weight decay on norm layers and biases (detectron2 practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": solver.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, solver: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per iteration with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, solver))
