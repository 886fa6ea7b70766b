"""Range checks of config values, run by :func:`sepsnet.config.validate` at load time.

Two layers: no number anywhere in a config may be NaN or infinite (a NaN learning rate trains
NaN weights without a single error), and each numeric key that has a meaningful range gets it
(learning rate > 0, momentum in [0, 1), batch size >= 1, ...). A key named in :data:`RULES` that
the config does not have is skipped, so the table survives renames of sections.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from sepsnet.errors import ConfigError

Rule = tuple[Callable[[float], bool], str]

POSITIVE: Rule = (lambda v: v > 0, "> 0")
NONNEGATIVE: Rule = (lambda v: v >= 0, ">= 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, ">= 1")
UNIT: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
UNIT_OPEN: Rule = (lambda v: 0 < v < 1, "in (0, 1)")
MOMENTUM: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
DECAY: Rule = (lambda v: 0 < v <= 1, "in (0, 1]")

# dotted key -> rule; a list value is checked item by item; None (optional keys) passes
RULES: dict[str, Rule] = {
    "solver.lr": POSITIVE,
    "solver.momentum": MOMENTUM,
    "solver.weight_decay": NONNEGATIVE,
    "solver.weight_decay_norm": NONNEGATIVE,
    "solver.weight_decay_bias": NONNEGATIVE,
    "solver.warmup_iters": NONNEGATIVE,
    "solver.warmup_factor": UNIT,
    "solver.steps": NONNEGATIVE,
    "solver.gamma": DECAY,
    "solver.max_iter": AT_LEAST_ONE,
    "solver.batch_size": AT_LEAST_ONE,
    "solver.clip_grad_norm": POSITIVE,
    "solver.checkpoint_period": NONNEGATIVE,
    "solver.eval_period": NONNEGATIVE,
    "solver.log_period": AT_LEAST_ONE,
    "solver.seed": NONNEGATIVE,
    "data.num_workers": NONNEGATIVE,
    "data.size_divisibility": AT_LEAST_ONE,
    "data.min_size_train": AT_LEAST_ONE,
    "data.max_size_train": AT_LEAST_ONE,
    "data.min_size_test": NONNEGATIVE,  # 0 = keep the original size
    "data.max_size_test": NONNEGATIVE,
    "data.pixel_std": POSITIVE,
    "model.fpn_channels": AT_LEAST_ONE,
    "model.fcos.num_convs": NONNEGATIVE,
    "model.fcos.strides": AT_LEAST_ONE,
    "model.fcos.sizes_of_interest": AT_LEAST_ONE,
    "model.fcos.center_sample_radius": NONNEGATIVE,
    "model.fcos.prior_prob": UNIT_OPEN,
    "model.fcos.focal_alpha": UNIT,
    "model.fcos.focal_gamma": NONNEGATIVE,
    "model.blender.max_train_instances": AT_LEAST_ONE,
    "model.heads.stuff_channels": AT_LEAST_ONE,
    "model.heads.basis_channels": AT_LEAST_ONE,
    "model.heads.basis_num_convs": NONNEGATIVE,
    "model.heads.confidence_roi_size": AT_LEAST_ONE,
    "model.loss_weights": NONNEGATIVE,  # every loss weight
}


def _lookup(cfg: Any, dotted: str) -> tuple[bool, Any]:
    node = cfg
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False, None
        node = getattr(node, part)
    return True, node


def _numbers(value: Any, key: str) -> list[tuple[str, Any]]:
    """(key, number) pairs of a value: itself, list items, or the fields of a section."""
    if dataclasses.is_dataclass(value):
        return [pair for f in dataclasses.fields(value) for pair in _numbers(getattr(value, f.name), f"{key}.{f.name}")]
    if isinstance(value, (list, tuple)):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [(key, value)]


def check_finite(node: Any, where: str, prefix: str = "") -> None:
    """No float anywhere in the config tree may be NaN or +-inf."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, where, f"{key}.")
            continue
        for name, v in _numbers(value, key):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{where}: {name} must be a finite number, got {v}")


def check_values(cfg: Any, where: str) -> None:
    """Finite numbers everywhere, then the ranges of :data:`RULES` and the relations between keys."""
    check_finite(cfg, where)
    for dotted, (ok, text) in RULES.items():
        found, value = _lookup(cfg, dotted)
        if not found:
            continue
        for name, v in _numbers(value, dotted):
            if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and not ok(v):
                raise ConfigError(f"{where}: {name} must be {text}, got {v}")
    solver = getattr(cfg, "solver", None)
    if solver is not None:
        steps = list(solver.steps)
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ConfigError(f"{where}: solver.steps must be strictly increasing, got {steps}")
        if solver.warmup_iters > 0 and solver.warmup_method == "constant" and solver.warmup_factor <= 0:
            raise ConfigError(f"{where}: solver.warmup_factor must be > 0 with a constant warm-up "
                              f"(lr would be 0 for {solver.warmup_iters} iterations), got {solver.warmup_factor}")
    data = getattr(cfg, "data", None)
    if data is not None and len(data.min_size_train) == 2 and data.min_size_train[0] > data.min_size_train[1]:
        raise ConfigError(f"{where}: data.min_size_train [lo, hi] needs lo <= hi, got {data.min_size_train}")
