"""Every semantic check of a config, in one place; :func:`sepsnet.config.validate` runs
:func:`check_config` at load time and :class:`sepsnet.model.sepsnet.SEPSNet` runs :func:`check_model`.

Three layers: no number anywhere in a config may be NaN or infinite (a NaN learning rate trains
NaN weights without a single error); each numeric key that has a meaningful range gets it
(learning rate > 0, momentum in [0, 1), batch size >= 1, ...; a key named in :data:`RULES` that
the config does not have is skipped, so the table survives renames of sections); and the choices
and relations between keys (:func:`check_model`, :func:`check_data`, :func:`check_solver`,
:func:`check_postprocess`). The backbone names come from the one registry,
:data:`sepsnet.model.registry.BACKBONES` (torch-free). The model parts and losses themselves take
explicit, already checked values (their ``from_config``).
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sepsnet.errors import ConfigError
from sepsnet.model.registry import BACKBONES

if TYPE_CHECKING:
    from sepsnet.config import DataConfig, ModelConfig, PostprocessConfig, SEPSNetConfig, SolverConfig

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


# --------------------------------------------------------------------------- choices and relations
def check_config(cfg: SEPSNetConfig, where: str = "config") -> None:
    """Every check of a whole config: model, data, solver, postprocess, then :func:`check_values`."""
    check_model(cfg.model, where)
    check_data(cfg.data, where)
    check_solver(cfg.solver, where)
    check_postprocess(cfg.postprocess, where)
    check_values(cfg, where)


def check_model(m: ModelConfig, where: str = "config", training: bool = False) -> None:
    """The model section. ``training``: also the checks for starting a training run (the pretrained file
    exists; no frozen random layers); a config stored in a checkpoint does not need its pretrained file."""
    _check_backbone(m, where, training)
    positive = {"fpn_channels": m.fpn_channels, "heads.stuff_channels": m.heads.stuff_channels,
                "heads.basis_channels": m.heads.basis_channels, "blender.num_bases": m.blender.num_bases,
                "blender.attn_size": m.blender.attn_size, "blender.mask_size": m.blender.mask_size,
                "blender.max_train_instances": m.blender.max_train_instances}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where}: model.{key} must be >= 1, got {value}")
    if m.heads.basis_num_convs < 0 or m.fcos.num_convs < 0:
        raise ConfigError(f"{where}: model.heads.basis_num_convs and model.fcos.num_convs must be >= 0")
    if m.heads.basis_norm not in ("GN", "BN"):
        raise ConfigError(f"{where}: model.heads.basis_norm must be GN or BN, got {m.heads.basis_norm!r}")
    if m.heads.confidence_roi_size < 2:
        raise ConfigError(f"{where}: model.heads.confidence_roi_size must be >= 2, got {m.heads.confidence_roi_size}")
    if len(m.fcos.strides) != 5 or len(m.fcos.sizes_of_interest) != 4:
        raise ConfigError(f"{where}: model.fcos needs 5 strides (P3..P7) and 4 sizes_of_interest")
    if list(m.fcos.strides) != [8, 16, 32, 64, 128]:
        raise ConfigError(f"{where}: model.fcos.strides must be [8, 16, 32, 64, 128] (the P3..P7 strides of "
                          f"the backbone), got {m.fcos.strides}")
    if not 0.0 < m.fcos.prior_prob < 1.0:
        raise ConfigError(f"{where}: model.fcos.prior_prob must be in (0, 1), got {m.fcos.prior_prob}")
    if m.num_thing_classes < 1 or m.num_stuff_classes < 0:
        raise ConfigError(f"{where}: model.num_thing_classes must be >= 1, num_stuff_classes >= 0")
    sizes = m.fcos.sizes_of_interest
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"{where}: model.fcos.sizes_of_interest must be strictly increasing, got {sizes}")
    if m.blender.sampling_ratio < 0:
        raise ConfigError(f"{where}: model.blender.sampling_ratio must be >= 0 (0 = adaptive), "
                          f"got {m.blender.sampling_ratio}")


def _check_backbone(m: ModelConfig, where: str, training: bool) -> None:
    b = m.backbone
    if b.name not in BACKBONES:
        raise ConfigError(f"{where}: model.backbone.name {b.name!r} not in {sorted(BACKBONES)}")
    if b.freeze_at not in (0, 1, 2):
        raise ConfigError(f"{where}: model.backbone.freeze_at must be 0, 1 or 2, got {b.freeze_at}")
    if training and b.pretrained and not os.path.isfile(b.pretrained):
        raise ConfigError(f"{where}: model.backbone.pretrained file not found: {b.pretrained}")
    if training and b.freeze_at > 0 and not b.pretrained and not b.allow_random_frozen:
        raise ConfigError(
            f"{where}: model.backbone.freeze_at={b.freeze_at} freezes randomly initialised layers because "
            f"model.backbone.pretrained is not set; point model.backbone.pretrained at local ImageNet weights "
            f"(e.g. R-101.pkl), or set model.backbone.freeze_at=0, or model.backbone.allow_random_frozen=true")
    if b.stride_in_1x1 and not BACKBONES[b.name].bottleneck:
        raise ConfigError(f"{where}: model.backbone.stride_in_1x1 needs a bottleneck trunk, not {b.name}")
    if len(b.deform_on_per_stage) != 4:
        raise ConfigError(f"{where}: model.backbone.deform_on_per_stage needs 4 values (res2..res5), "
                          f"got {b.deform_on_per_stage}")
    if any(b.deform_on_per_stage) and not BACKBONES[b.name].bottleneck:
        raise ConfigError(f"{where}: model.backbone.deform_on_per_stage needs a bottleneck trunk (ResNet-50 and "
                          f"deeper, ResNeXt), not {b.name}")
    for key in ("deform_interval", "deform_num_groups"):
        if getattr(b, key) < 1:
            raise ConfigError(f"{where}: model.backbone.{key} must be >= 1, got {getattr(b, key)}")


def check_data(d: DataConfig, where: str = "config") -> None:
    """Dataset format, sizes and the input convention."""
    if d.format not in ("coco_panoptic", "cityscapes"):
        raise ConfigError(f"{where}: data.format must be coco_panoptic or cityscapes, got {d.format!r}")
    if len(d.min_size_train) not in (1, 2):
        raise ConfigError(f"{where}: data.min_size_train must be [size] or [lo, hi]")
    if len(d.pixel_mean) != 3 or len(d.pixel_std) != 3:
        raise ConfigError(f"{where}: data.pixel_mean/pixel_std need 3 values")
    if d.input_format not in ("RGB", "BGR"):
        raise ConfigError(f"{where}: data.input_format must be RGB or BGR, got {d.input_format!r}")
    if any(v <= 0 for v in d.pixel_std):
        raise ConfigError(f"{where}: data.pixel_std values must be > 0, got {d.pixel_std}")


def check_solver(s: SolverConfig, where: str = "config") -> None:
    """Warm-up method and non-negative weight decays."""
    if s.warmup_method not in ("constant", "linear"):
        raise ConfigError(f"{where}: solver.warmup_method must be constant or linear")
    for key in ("weight_decay", "weight_decay_norm", "weight_decay_bias"):
        value = getattr(s, key)
        if value is not None and value < 0:
            raise ConfigError(f"{where}: solver.{key} must be >= 0, got {value}")


_UNIT_INTERVAL = ("score_thresh", "nms_thresh", "alpha", "dedup_iou", "mask_thresh", "overlap_thresh",
                  "instance_score_thresh")


def check_postprocess(p: PostprocessConfig, where: str = "config") -> None:
    """Thresholds in [0, 1], counts >= 1."""
    for key in _UNIT_INTERVAL:
        value = getattr(p, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: postprocess.{key} must be in [0, 1], got {value}")
    for key in ("max_instances", "pre_nms_topk"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{where}: postprocess.{key} must be >= 1, got {getattr(p, key)}")
    if p.stuff_area_limit < 0:
        raise ConfigError(f"{where}: postprocess.stuff_area_limit must be >= 0, got {p.stuff_area_limit}")
