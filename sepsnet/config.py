"""Typed configuration loaded from YAML.

Every section is a plain (mutable) dataclass. ``load_config`` rejects unknown keys and
values of the wrong type with a :class:`ConfigError` naming the file and the key,
so a typo in a YAML file never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from sepsnet.errors import ConfigError


@dataclass
class BackboneConfig:
    """ResNet/ResNeXt trunk (torchvision) with frozen BatchNorm."""

    name: str = "resnet50"  # one of sepsnet.model.registry.BACKBONES
    # local weights file, never downloaded: a torchvision state dict (.pth/.pt) or a detectron2
    # model-zoo backbone (R-50.pkl, R-101.pkl, X-101-32x8d.pkl); see README "Pretrained backbones"
    pretrained: str | None = None
    freeze_at: int = 2  # 0 = train everything, 1 = freeze stem, 2 = stem + res2
    # stride-2 on the 1x1 conv of each bottleneck (MSRA/caffe2 ResNets, detectron2 STRIDE_IN_1X1);
    # false = on the 3x3 conv (torchvision, FAIR ResNeXt)
    stride_in_1x1: bool = False
    # freeze_at > 0 with no pretrained weights freezes random layers; refused unless this is true
    allow_random_frozen: bool = False
    # deformable 3x3 convs (detectron2 MODEL.RESNETS.DEFORM_*; AdelaiDet *_dcni3_* configs: [false, true,
    # true, true], modulated, interval 3); bottleneck trunks only; see README "Deformable convolutions"
    deform_on_per_stage: list[bool] = field(default_factory=lambda: [False, False, False, False])  # res2..res5
    deform_modulated: bool = False  # DCNv2: a sigmoid mask per kernel tap
    deform_interval: int = 1  # block i of a deformable stage is deformable when i % interval == 0
    deform_num_groups: int = 1  # offset groups


@dataclass
class FCOSConfig:
    """FCOS box head on P3..P7 (AdelaiDet defaults)."""

    num_convs: int = 4
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    sizes_of_interest: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    center_sample_radius: float = 1.5
    prior_prob: float = 0.01
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class BlenderConfig:
    """BlendMask blender (paper Eq. 3)."""

    num_bases: int = 4  # K
    attn_size: int = 14  # M
    mask_size: int = 56  # R
    sampling_ratio: int = 1
    fused: bool = False  # use torch.ops.sepsnet.roi_blend (cpp_plugins) when built
    max_train_instances: int = 100  # positives sampled per batch for the mask loss (BlendMask)


@dataclass
class HeadsConfig:
    """Widths and depths of the dense heads."""

    stuff_channels: int = 128  # Panoptic FPN semantic head width (one conv per 2x upsampling)
    basis_channels: int = 128
    basis_num_convs: int = 3
    basis_norm: str = "GN"  # GN (SE-PSNet) | BN (AdelaiDet BlendMask's SyncBN basis module)
    confidence_roi_size: int = 14


@dataclass
class ComponentsConfig:
    """The five Table I components; all off = BlendMask + stuff branch baseline."""

    mask_loss: bool = True  # BCE + soft Jaccard + silhouette Dice on mask logits
    mask_score: bool = True  # confidence head, Eq. 4 scoring, silhouette dedup
    silhouette_feature: bool = True  # silhouette basis in the basis head
    mask_aux: bool = True  # two convs on mask logits predicting the silhouette
    silhouette_stuff: bool = True  # aux silhouette output of the stuff head


@dataclass
class LossWeightsConfig:
    """Loss weights (w for the mask loss family, see DESIGN.md facts)."""

    fcos_cls: float = 1.0
    fcos_box: float = 1.0
    fcos_ctr: float = 1.0
    mask_bce: float = 1.0
    mask_iou: float = 1.0  # w: soft Jaccard; silhouette Dice on mask gets 0.5*w
    mask_aux: float = 0.3
    stuff: float = 1.0
    stuff_silhouette: float = 1.0
    basis_silhouette: float = 1.0
    basis_aux_semantic: float = 1.0
    confidence: float = 1.0


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    num_thing_classes: int = 80
    num_stuff_classes: int = 53
    fcos: FCOSConfig = field(default_factory=FCOSConfig)
    blender: BlenderConfig = field(default_factory=BlenderConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)


@dataclass
class DataConfig:
    """Dataset location and the paper's transforms."""

    format: str = "coco_panoptic"  # coco_panoptic | cityscapes
    train_root: str | None = None
    val_root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    min_size_train: list[int] = field(default_factory=lambda: [640, 800])  # [lo, hi] range
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    size_divisibility: int = 32
    random_flip: bool = True
    # channel order the network expects; pixel_mean/std are given in that order (0..255 scale).
    # RGB + ImageNet values for torchvision weights; BGR, std 1 for detectron2 MSRA weights
    input_format: str = "RGB"  # RGB | BGR
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    num_workers: int = 2
    skip_bad: bool = False


@dataclass
class SolverConfig:
    """SGD schedule (paper IV-A)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # GroupNorm/BatchNorm/LayerNorm parameters (detectron2)
    weight_decay_bias: float | None = None  # biases; None = same as weight_decay
    warmup_iters: int = 1000
    warmup_factor: float = 1.0 / 3.0
    warmup_method: str = "constant"  # constant | linear
    steps: list[int] = field(default_factory=lambda: [120000, 420000, 500000])
    gamma: float = 0.1
    max_iter: int = 600000
    batch_size: int = 6
    clip_grad_norm: float | None = None
    amp: bool = True  # only takes effect on CUDA
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0 = no periodic evaluation
    log_period: int = 20
    seed: int = 0


@dataclass
class PostprocessConfig:
    """Inference thresholds shared by evaluation and the runtime (DESIGN: inference split)."""

    score_thresh: float = 0.05
    pre_nms_topk: int = 1000  # per level
    nms_thresh: float = 0.6
    max_instances: int = 100
    alpha: float = 0.8  # Eq. 4
    dedup_iou: float = 0.7  # silhouette dedup (III-G)
    mask_thresh: float = 0.5
    overlap_thresh: float = 0.5
    stuff_area_limit: int = 4096
    instance_score_thresh: float = 0.5


@dataclass
class SEPSNetConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    source: str | None = None  # file the config was loaded from (informational)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - names, key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**kwargs)


def validate(cfg: SEPSNetConfig, where: str = "config") -> SEPSNetConfig:
    """Semantic checks that types alone cannot express; they all live in :mod:`sepsnet.config_checks`."""
    from sepsnet.config_checks import check_config

    check_config(cfg, where)
    return cfg


def validate_model(m: ModelConfig, where: str = "config", training: bool = False) -> ModelConfig:
    """The model-section checks (:func:`sepsnet.config_checks.check_model`); ``training``: also those for
    starting a training run (the pretrained file exists; no frozen random layers)."""
    from sepsnet.config_checks import check_model

    check_model(m, where, training)
    return m


def config_from_dict(raw: dict[str, Any], where: str = "config") -> SEPSNetConfig:
    """Build a validated config from a plain dict (e.g. stored in a checkpoint)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping")
    raw = {k: v for k, v in raw.items() if k != "source"}
    cfg = _build(SEPSNetConfig, raw, "")
    return validate(cfg, where)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SEPSNetConfig:
    """Load a YAML config. ``_base_: other.yaml`` (relative path) is merged first."""
    path = Path(path)
    raw = _read_yaml(path)
    if overrides:
        raw = _merge(raw, overrides)
    try:
        cfg = config_from_dict(raw, where=str(path))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    cfg.source = str(path)
    return cfg


def _yaml_where(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: <problem>`` of a PyYAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and, first, its ``_base_`` chain. ConfigError naming the file for a
    missing or unreadable file, text that is not UTF-8, invalid YAML and a ``_base_`` cycle."""
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(key):], key))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    if not path.is_file():
        where = f" (_base_ of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML{_yaml_where(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("_base_", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: _base_ must be a relative file name, got {base!r}")
        raw = _merge(_read_yaml(path.parent / base, (*chain, key)), raw)
    return raw


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["solver.max_iter=30", "model.components.mask_aux=false"]`` -> nested dict
    (values parsed as YAML scalars/lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part; expected section.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: invalid value{_yaml_where(exc)}") from None
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is already set to a value "
                                  "by an earlier override")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override {item!r}: {key.strip()} is a section set by an earlier override")
        node[parts[-1]] = value
    return out
