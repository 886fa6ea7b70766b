"""Learning-rate schedule of the paper (IV-A): warm-up, then x gamma at each step."""
from __future__ import annotations

from bisect import bisect_right
from typing import Any

import torch
from torchvision.ops.misc import FrozenBatchNorm2d

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


# parameters of these layers get ``solver.weight_decay_norm`` (detectron2: WEIGHT_DECAY_NORM)
NORM_TYPES: tuple[type, ...] = (
    torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
    torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm, FrozenBatchNorm2d,
)


def param_groups(model: torch.nn.Module, solver: SolverConfig) -> list[dict[str, Any]]:
    """Weight-decay groups as in detectron2's ``get_default_optimizer_params``: parameters
    of normalisation layers (GroupNorm/BatchNorm/LayerNorm/FrozenBatchNorm, ...) get
    ``weight_decay_norm`` (default 0), biases of other layers get ``weight_decay_bias``
    (default ``None``: the same as ``weight_decay``), everything else ``weight_decay``.
    Groups are named ``decay``, ``norm``, ``bias``; empty ones are left out."""
    bias_decay = solver.weight_decay if solver.weight_decay_bias is None else solver.weight_decay_bias
    buckets: dict[str, list[torch.nn.Parameter]] = {"decay": [], "norm": [], "bias": []}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            kind = "norm" if isinstance(module, NORM_TYPES) else ("bias" if name == "bias" else "decay")
            buckets[kind].append(param)
    decay = {"decay": solver.weight_decay, "norm": solver.weight_decay_norm, "bias": bias_decay}
    return [{"name": k, "params": v, "weight_decay": decay[k]} for k, v in buckets.items() if v]


def build_optimizer(model: torch.nn.Module, solver: SolverConfig) -> torch.optim.Optimizer:
    """SGD with momentum over :func:`param_groups` (paper IV-A: momentum 0.9, weight decay 1e-4)."""
    return torch.optim.SGD(param_groups(model, solver), lr=solver.lr, momentum=solver.momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, solver: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per iteration with :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, solver))
