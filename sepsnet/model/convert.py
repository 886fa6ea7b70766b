"""Models trained with the authors' SE-PSNet code or AdelaiDet BlendMask (detectron2) -> sepsnet checkpoints.

Source layouts (names and shapes read from the public code: github.com/shuoenchang/SE-PSNet "initial
release", adet/modeling/sepsnet/*; github.com/aim-uofa/AdelaiDet adet/modeling/{fcos,blendmask}/*;
detectron2 ResNet/FPN/SemSegFPNHead):

==========================================  =====================================================
detectron2 / AdelaiDet key                  sepsnet key
==========================================  =====================================================
backbone.bottom_up.stem.conv1[.norm.*]      backbone.body.conv1 / bn1
backbone.bottom_up.resN.i.convK[.norm.*]    backbone.body.layer{N-1}.i.convK / bnK
backbone.bottom_up.resN.i.shortcut[.norm]   backbone.body.layer{N-1}.i.downsample.0 / .1
backbone.bottom_up.resN.i.conv2_offset      backbone.body.layer{N-1}.i.conv2.offset (deformable blocks,
                                            MODEL.RESNETS.DEFORM_*: stages, interval, modulated, groups
                                            read from which blocks have one and its 18/27 x G outputs)
backbone.fpn_lateral{l} / fpn_output{l}     backbone.fpn.inner_blocks.{l-2}.0 / layer_blocks.{l-2}.0
backbone.top_block.p6 / p7                  backbone.fpn.extra_blocks.p6 / p7
proposal_generator.fcos_head.*              fcos_head.* (cls_tower, bbox_tower, cls_logits, bbox_pred,
                                            ctrness, scales; no scales with FCOS.USE_SCALE False: 1.0)
top_layer                                   fcos_head.top_layer (the blender's attention layer)
basis_module.refine.{i}                     basis_head.lateral.{i}
basis_module.tower.{0..n-1} / n+1 / n+2     basis_head.tower.* / refine / out (n = NUM_CONVS; n = upsample)
basis_module.seg_head                       basis_head.semantic (train-only)
panoptic_module.p{l}.{2k}[.norm]            stuff_head.scale_heads.{l-2}.{k}.0 / .1
panoptic_module.predictor                   stuff_head.classifier (rows reordered: "things" row last)
panoptic_module.contour_predictor           stuff_head.silhouette (SE-PSNet, train-only)
blender.iou_head.tower.{0..3}.0 / 5 / 7     confidence_head.convs.{0,2,4,6} / fc.0 / fc.2 (SE-PSNet)
blender.contour_aux_head.tower.0.0 / 1      mask_aux.conv1 / conv2 (SE-PSNet, train-only)
==========================================  =====================================================

The SE-PSNet silhouette basis (BASIS_MODULE.ONE_BASIS_CONTOUR_ON) is the last of NUM_BASES bases and
is blended like the others, so a converted model has ``blender.num_bases = NUM_BASES`` and
``components.silhouette_feature = false`` (identical inference; fine-tuning does not apply the Dice
loss to that basis). Panoptic FPN's stuff predictor holds "things" in row 0 and the stuff classes
in 1..S (detectron2 "panoptic_separated"); sepsnet keeps stuff 0..S-1 and "thing" at S.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import CheckpointError, ConfigError
from sepsnet.model.deform import MODULATED_PER_GROUP, OFFSETS_PER_GROUP
from sepsnet.model.pretrained import MSRA, InputConvention, d2_to_torchvision, safe_unpickle
from sepsnet.model.registry import BACKBONES, backbone_for


@dataclass
class Layout:
    """What the source checkpoint holds, read from its names and shapes."""

    backbone: str
    fpn_channels: int
    has_p2: bool
    num_thing_classes: int
    fcos_num_convs: int
    use_scale: bool
    num_bases: int | None = None
    attn_size: int | None = None
    basis_channels: int | None = None
    basis_num_convs: int | None = None
    basis_norm: str = "GN"
    basis_semantic: bool = False
    stuff_channels: int | None = None
    num_stuff_classes: int | None = None
    stuff_silhouette: bool = False
    confidence: bool = False
    mask_aux: bool = False
    deform_on_per_stage: tuple[bool, bool, bool, bool] = (False, False, False, False)
    deform_modulated: bool = False
    deform_interval: int = 1
    deform_num_groups: int = 1

    @property
    def is_detector(self) -> bool:
        """An FCOS detector (no basis module, attention layer or stuff head)."""
        return self.num_bases is None


@dataclass
class Conversion:
    """The converted state and what happened to every tensor."""

    state: dict[str, Tensor]
    config: SEPSNetConfig
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> sepsnet key
    unused: dict[str, str] = field(default_factory=dict)  # source key -> why not used
    random: list[str] = field(default_factory=list)  # sepsnet keys left at their initialisation
    filled: dict[str, str] = field(default_factory=dict)  # sepsnet key -> what it was set to and why
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"mapped {len(self.mapped)} source tensors; {len(self.unused)} unused; "
                 f"{len(self.filled)} set to constants; {len(self.random)} left at their initialisation"]
        lines += [f"  unused: {k} ({why})" for k, why in sorted(self.unused.items())]
        lines += [f"  set: {k} = {why}" for k, why in sorted(self.filled.items())]
        lines += [f"  random: {k}" for k in self.random]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading
def read_source(path: str | Path) -> dict[str, Tensor]:
    """A detectron2 checkpoint (``model_final.pth``: ``{"model": state, ...}``, or a bare state dict;
    ``.pkl``: dict of numpy arrays under ``"model"``) -> flat state of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".pkl":
        obj: Any = safe_unpickle(path.read_bytes(), str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt, or pickled objects weights_only refuses
            raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict")
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            out[str(k)] = v
        elif hasattr(v, "dtype") and hasattr(v, "shape"):  # numpy array from a .pkl
            out[str(k)] = torch.as_tensor(v)
    if not out:
        raise CheckpointError(f"{path}: no tensors in the model state")
    for k, v in out.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: weight {k!r} contains NaN or Inf")
    return out


def _need(state: dict[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"not a detectron2 FCOS/BlendMask/SE-PSNet checkpoint: no {key} ({what})")
    return state[key]


def _indices(state: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integer indices i of keys ``prefix.i.*``."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pat.match(k)] if m})


def detect_layout(state: dict[str, Tensor]) -> Layout:
    """Backbone depth/groups, widths, class counts and optional parts from names and shapes."""
    bu = "backbone.bottom_up."
    _need(state, bu + "stem.conv1.weight", "ResNet stem")
    blocks = tuple(len(_indices(state, f"{bu}res{n}")) for n in (2, 3, 4, 5))
    bottleneck = bu + "res2.0.conv3.weight" in state
    groups, width = 1, 64
    if bottleneck:
        w1, w2 = state[bu + "res2.0.conv1.weight"], state[bu + "res2.0.conv2.weight"]
        groups = int(w2.shape[0]) // int(w2.shape[1])
        width = int(w1.shape[0]) // groups
    name = backbone_for(blocks, bottleneck, groups, width)
    if name is None:
        raise CheckpointError(f"backbone with blocks {blocks}, groups {groups}, width {width} is not one of "
                              f"sepsnet's backbones")
    head = "proposal_generator.fcos_head."
    cls_w = _need(state, head + "cls_logits.weight", "FCOS classifier")
    deform_tower = sorted(k for k in state if re.match(re.escape(head) + r"(cls|bbox)_tower\.\d+\.\w+\.", k))
    if deform_tower:
        raise CheckpointError(f"FCOS tower convs with sub-modules ({deform_tower[0]}, ...): deformable FCOS towers "
                              f"(FCOS.USE_DEFORMABLE) are not supported; only deformable backbones are")
    layout = Layout(
        backbone=name,
        fpn_channels=int(_need(state, "backbone.fpn_lateral3.weight", "FPN").shape[0]),
        has_p2="backbone.fpn_lateral2.weight" in state,
        num_thing_classes=int(cls_w.shape[0]),
        fcos_num_convs=sum(1 for k in state if re.fullmatch(re.escape(head) + r"cls_tower\.\d+\.weight", k)
                           and state[k].dim() == 4),
        use_scale=head + "scales.0.scale" in state)
    _detect_deform(state, blocks, layout)
    if "top_layer.weight" not in state:
        return layout  # an FCOS detector
    tower = _indices(state, "basis_module.tower")
    if not tower:
        raise CheckpointError("top_layer present but no basis_module.tower.*: not a BlendMask/SE-PSNet model")
    last = tower[-1]
    layout.num_bases = int(state[f"basis_module.tower.{last}.weight"].shape[0])
    attn_len = int(state["top_layer.weight"].shape[0])
    side = math.isqrt(attn_len // layout.num_bases)
    if side * side * layout.num_bases != attn_len:
        raise CheckpointError(f"top_layer has {attn_len} outputs, not NUM_BASES ({layout.num_bases}) x M x M")
    layout.attn_size = side
    layout.basis_channels = int(state["basis_module.refine.0.0.weight"].shape[0])
    layout.basis_num_convs = last - 2
    layout.basis_norm = "BN" if "basis_module.refine.0.1.running_mean" in state else "GN"
    layout.basis_semantic = "basis_module.seg_head.2.weight" in state
    if "panoptic_module.predictor.weight" in state:
        layout.stuff_channels = int(state["panoptic_module.p2.0.weight"].shape[0])
        layout.num_stuff_classes = int(state["panoptic_module.predictor.weight"].shape[0]) - 1
        layout.stuff_silhouette = "panoptic_module.contour_predictor.weight" in state
    layout.confidence = "blender.iou_head.tower.0.0.weight" in state
    layout.mask_aux = "blender.contour_aux_head.tower.0.0.weight" in state
    return layout


def _detect_deform(state: dict[str, Tensor], blocks: tuple[int, ...], layout: Layout) -> None:
    """MODEL.RESNETS.DEFORM_ON_PER_STAGE / INTERVAL / MODULATED / NUM_GROUPS from the ``conv2_offset`` tensors."""
    bu = "backbone.bottom_up."
    found = {(s, i): state[f"{bu}res{s + 2}.{i}.conv2_offset.weight"]
             for s in range(4) for i in range(blocks[s]) if f"{bu}res{s + 2}.{i}.conv2_offset.weight" in state}
    if not found:
        return
    channels = {int(w.shape[0]) for w in found.values()}
    if len(channels) != 1:
        raise CheckpointError(f"deformable blocks with different offset widths {sorted(channels)}")
    (c,) = channels
    plain, modulated = c % OFFSETS_PER_GROUP == 0, c % MODULATED_PER_GROUP == 0
    if plain == modulated:
        raise CheckpointError(f"conv2_offset has {c} outputs: not 18 x G (DEFORM_MODULATED False) or 27 x G "
                              f"(True), or both; cannot tell whether the convs are modulated")
    on = tuple(any(s == st for st, _ in found) for s in range(4))
    per_stage = {s: sorted(i for st, i in found if st == s) for s in range(4) if on[s]}
    gaps = {b - a for idx in per_stage.values() for a, b in zip(idx, idx[1:])}
    interval = gaps.pop() if len(gaps) == 1 else max(blocks[s] for s in per_stage) if not gaps else 0
    if interval < 1 or any(idx != list(range(0, blocks[s], interval)) for s, idx in per_stage.items()):
        raise CheckpointError(f"deformable blocks {per_stage} (per stage index 0 = res2) do not follow "
                              f"DEFORM_INTERVAL (block i deformable when i % interval == 0)")
    layout.deform_on_per_stage = on  # type: ignore[assignment]
    layout.deform_modulated = modulated
    layout.deform_interval = interval
    layout.deform_num_groups = c // (MODULATED_PER_GROUP if modulated else OFFSETS_PER_GROUP)


def config_for(layout: Layout, base: SEPSNetConfig, convention: InputConvention | None = None,
               stride_in_1x1: bool | None = None) -> SEPSNetConfig:
    """``base`` with every model key the checkpoint decides, and the input convention."""
    m = base.model
    if layout.is_detector:  # partial init: heads keep the base config's shapes
        num_bases, attn = m.blender.num_bases, m.blender.attn_size
    else:
        num_bases, attn = int(layout.num_bases or 0), int(layout.attn_size or 0)
    if stride_in_1x1 is None:  # detectron2 MSRA ResNets: on the 1x1; the ResNeXt configs set it False
        stride_in_1x1 = BACKBONES[layout.backbone].bottleneck and BACKBONES[layout.backbone].groups == 1
    conv = convention or MSRA  # detectron2 defaults (INPUT.FORMAT BGR, PIXEL_STD 1), kept by the authors' configs
    heads = m.heads
    if not layout.is_detector:
        heads = replace(heads, basis_channels=int(layout.basis_channels or 0),
                        basis_num_convs=int(layout.basis_num_convs or 0), basis_norm=layout.basis_norm,
                        stuff_channels=layout.stuff_channels or heads.stuff_channels)
    components = m.components
    if not layout.is_detector:
        components = replace(components, silhouette_feature=False, mask_score=layout.confidence,
                             mask_aux=layout.mask_aux, silhouette_stuff=layout.stuff_silhouette,
                             mask_loss=layout.confidence)
    model = replace(
        m, backbone=replace(m.backbone, name=layout.backbone, pretrained=None, stride_in_1x1=stride_in_1x1,
                            deform_on_per_stage=list(layout.deform_on_per_stage),
                            deform_modulated=layout.deform_modulated, deform_interval=layout.deform_interval,
                            deform_num_groups=layout.deform_num_groups),
        fpn_channels=layout.fpn_channels, num_thing_classes=layout.num_thing_classes,
        num_stuff_classes=m.num_stuff_classes if layout.num_stuff_classes is None else layout.num_stuff_classes,
        fcos=replace(m.fcos, num_convs=layout.fcos_num_convs),
        blender=replace(m.blender, num_bases=num_bases, attn_size=attn), heads=heads, components=components)
    data = replace(base.data, input_format=conv.input_format, pixel_mean=list(conv.pixel_mean),
                   pixel_std=list(conv.pixel_std))
    return SEPSNetConfig(model=model, data=data, solver=base.solver, postprocess=base.postprocess)


# ------------------------------------------------------------------------------------------ names
def _backbone_key(k: str) -> str | None:
    if k.startswith("backbone.bottom_up."):
        tv = d2_to_torchvision(k[len("backbone.bottom_up."):])
        return None if tv is None else "backbone.body." + tv
    m = re.fullmatch(r"backbone\.fpn_(lateral|output)([2-5])\.(weight|bias)", k)
    if m:
        kind = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
        return f"backbone.fpn.{kind}.{int(m.group(2)) - 2}.0.{m.group(3)}"
    m = re.fullmatch(r"backbone\.top_block\.(p6|p7)\.(weight|bias)", k)
    if m:
        return f"backbone.fpn.extra_blocks.{m.group(1)}.{m.group(2)}"
    return None


def _head_key(k: str) -> str | None:
    m = re.fullmatch(r"proposal_generator\.fcos_head\.((cls_tower|bbox_tower)\.\d+\.(weight|bias)|"
                     r"(cls_logits|bbox_pred|ctrness)\.(weight|bias)|scales\.\d+\.scale)", k)
    if m:
        return "fcos_head." + m.group(1)
    if k in ("top_layer.weight", "top_layer.bias"):
        return "fcos_head." + k
    return None


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


def _basis_key(k: str, num_convs: int) -> str | None:
    m = re.fullmatch(r"basis_module\.refine\.(\d+)\.([01])\." + _BN, k)
    if m:
        return f"basis_head.lateral.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"basis_module\.tower\.(\d+)\.(?:([01])\.)?" + _BN, k)
    if m:
        i, sub, leaf = int(m.group(1)), m.group(2), m.group(3)
        if i < num_convs and sub is not None:
            return f"basis_head.tower.{i}.{sub}.{leaf}"
        if i == num_convs + 1 and sub is not None:
            return f"basis_head.refine.{sub}.{leaf}"
        if i == num_convs + 2 and sub is None:
            return f"basis_head.out.{leaf}"
        return None
    m = re.fullmatch(r"basis_module\.seg_head\.([01])\.([01])\." + _BN, k)
    if m:
        return f"basis_head.semantic.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"basis_module\.seg_head\.2\.(weight|bias)", k)
    if m:
        return f"basis_head.semantic.2.{m.group(1)}"
    return None


def _stuff_key(k: str) -> str | None:
    m = re.fullmatch(r"panoptic_module\.p([2-5])\.(\d+)\.(weight|norm\.weight|norm\.bias)", k)
    if m:
        level, idx, leaf = int(m.group(1)) - 2, int(m.group(2)), m.group(3)
        if idx % 2:  # odd indices are the parameter-free upsampling layers
            return None
        sub = "0.weight" if leaf == "weight" else "1." + leaf.split(".")[1]
        return f"stuff_head.scale_heads.{level}.{idx // 2}.{sub}"
    m = re.fullmatch(r"panoptic_module\.(predictor|contour_predictor)\.(weight|bias)", k)
    if m:
        return f"stuff_head.{'classifier' if m.group(1) == 'predictor' else 'silhouette'}.{m.group(2)}"
    return None


_CONF = {"0.0": "convs.0", "1.0": "convs.2", "2.0": "convs.4", "3.0": "convs.6", "5": "fc.0", "7": "fc.2"}


def _blender_key(k: str) -> str | None:
    m = re.fullmatch(r"blender\.iou_head\.tower\.(\d(?:\.0)?)\.(weight|bias)", k)
    if m and m.group(1) in _CONF:
        return f"confidence_head.{_CONF[m.group(1)]}.{m.group(2)}"
    m = re.fullmatch(r"blender\.contour_aux_head\.tower\.(0\.0|1)\.(weight|bias)", k)
    if m:
        return f"mask_aux.{'conv1' if m.group(1) == '0.0' else 'conv2'}.{m.group(2)}"
    return None


def target_key(k: str, layout: Layout) -> str | None:
    """The sepsnet key of a source key (None: no counterpart)."""
    finders: list[Callable[[str], str | None]] = [
        _backbone_key, _head_key, lambda s: _basis_key(s, int(layout.basis_num_convs or 0)), _stuff_key,
        _blender_key]
    for find in finders:
        key = find(k)
        if key is not None:
            return key
    return None


_NOT_WEIGHTS = ("pixel_mean", "pixel_std")


def _reorder_stuff(t: Tensor, thing_index: int) -> Tensor:
    """Predictor rows [.., things at thing_index, ..] -> stuff rows in order, then the things row."""
    rows = [i for i in range(t.shape[0]) if i != thing_index] + [thing_index]
    return t[rows].clone()


def _source_convention(state: dict[str, Tensor]) -> InputConvention | None:
    """detectron2 models that register pixel_mean/pixel_std buffers carry their convention (values only;
    the channel order is the config's INPUT.FORMAT, BGR unless said otherwise)."""
    if "pixel_mean" not in state or "pixel_std" not in state:
        return None
    mean = tuple(float(v) for v in state["pixel_mean"].flatten())
    std = tuple(float(v) for v in state["pixel_std"].flatten())
    if len(mean) != 3 or len(std) != 3:
        return None
    return InputConvention("BGR", mean, std, True)  # type: ignore[arg-type]


def convert_state(state: dict[str, Tensor], base: SEPSNetConfig, *, partial: bool = False,
                  stride_in_1x1: bool | None = None, input_format: str | None = None,
                  pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None,
                  stuff_thing_index: int = 0) -> Conversion:
    """Map a detectron2/AdelaiDet state onto ``build_model(config)``; see the module docstring.

    ``partial``: the source may leave inference weights uncovered (an FCOS detector used as
    initialisation); otherwise every inference weight must come from the source. Every source
    tensor is either mapped or reported in ``unused``; every shape is checked."""
    from sepsnet.model import build_model

    layout = detect_layout(state)
    if layout.is_detector and not partial:
        raise CheckpointError("the checkpoint is an FCOS detector (no basis_module / top_layer): convert it with "
                              "--partial to use it as an initialisation")
    cfg = config_for(layout, base, _source_convention(state), stride_in_1x1)
    d = cfg.data
    cfg.data = replace(d, input_format=input_format or d.input_format, pixel_mean=list(pixel_mean or d.pixel_mean),
                       pixel_std=list(pixel_std or d.pixel_std))
    try:
        from sepsnet.config import validate

        validate(cfg, "converted config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    with torch.random.fork_rng(devices=[]):  # reproducible initialisation of uncovered parts, caller's RNG kept
        torch.manual_seed(0)
        model = build_model(cfg)  # train layout: the train-only parts are converted too
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    result = Conversion(state={}, config=cfg)
    bad_shapes: list[str] = []
    for k, v in state.items():
        if k in _NOT_WEIGHTS:
            result.unused[k] = "input normalisation, carried into data.pixel_mean/pixel_std"
            continue
        key = target_key(k, layout)
        if key is None:
            result.unused[k] = "no counterpart in sepsnet"
            continue
        if key not in own:
            result.unused[k] = f"{key} is not part of this model"
            continue
        if key == "stuff_head.classifier.weight" or key == "stuff_head.classifier.bias":
            if not 0 <= stuff_thing_index < v.shape[0]:
                raise CheckpointError(f"stuff_thing_index {stuff_thing_index} outside the {v.shape[0]} "
                                      f"stuff predictor rows")
            v = _reorder_stuff(v, stuff_thing_index)
        if key.endswith(".num_batches_tracked"):
            out[key] = v.to(own[key].dtype).reshape(own[key].shape)
            result.mapped[k] = key
            continue
        if tuple(v.shape) != tuple(own[key].shape):
            bad_shapes.append(f"{k} {list(v.shape)} -> {key} {list(own[key].shape)}")
            continue
        if key in out:
            raise CheckpointError(f"two source tensors map to {key} (second: {k})")
        out[key] = v.to(own[key].dtype).clone()
        result.mapped[k] = key
    if bad_shapes:
        raise CheckpointError(f"{len(bad_shapes)} tensors do not fit the derived config: " + "; ".join(bad_shapes[:6]))
    if not layout.use_scale:
        for i in range(len(cfg.model.fcos.strides)):
            key = f"fcos_head.scales.{i}.scale"
            out[key] = torch.ones_like(own[key])
            result.filled[key] = "1.0 (source has no per-level scales: FCOS.USE_SCALE False)"
    missing = [k for k in own if k not in out]
    aux = tuple(n + "." for n in model.aux_module_names())
    needed = [k for k in missing if not k.startswith(aux) and not k.endswith("num_batches_tracked")]
    if needed and not partial:
        raise CheckpointError(f"{len(needed)} inference weights have no source tensor: {', '.join(needed[:8])}"
                              + (" ..." if len(needed) > 8 else ""))
    for k in missing:
        out[k] = own[k].clone()
        if not k.endswith("num_batches_tracked"):
            result.random.append(k)
    if layout.num_bases is not None and not layout.is_detector:
        result.notes.append(f"blender.num_bases = {layout.num_bases} (NUM_BASES); an SE-PSNet silhouette basis is "
                            f"the last of them and blended, so components.silhouette_feature = false")
    if layout.num_stuff_classes is not None:
        result.notes.append(f"stuff predictor row {stuff_thing_index} ('things') moved to index "
                            f"{layout.num_stuff_classes}; stuff rows keep their order")
    if any(layout.deform_on_per_stage):
        result.notes.append(f"deformable backbone: stages {list(layout.deform_on_per_stage)} (res2..res5), "
                            f"interval {layout.deform_interval}, modulated {layout.deform_modulated}, "
                            f"{layout.deform_num_groups} offset group(s)")
    result.notes.append(f"input: {cfg.data.input_format}, mean {cfg.data.pixel_mean}, std {cfg.data.pixel_std}, "
                        f"stride_in_1x1 {cfg.model.backbone.stride_in_1x1}")
    result.state = out
    return result


# ------------------------------------------------------------------------------------------ metadata
def read_class_metadata(path: str | Path, num_things: int, num_stuff: int) -> dict[str, Any]:
    """Class table from a COCO panoptic categories JSON (a list, or a dict with ``categories``: the
    ascending-id order is the detectron2 contiguous order) or a sepsnet metadata JSON
    (``{"things": [...], "stuff": [...]}``); counts checked against the model."""
    import json

    from sepsnet.data.metadata import ClassMetadata
    from sepsnet.errors import DataError

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read class metadata {path}: {exc}") from None
    try:
        if isinstance(raw, dict) and "things" in raw:
            meta = ClassMetadata.from_dict(raw)
        else:
            cats = raw.get("categories") if isinstance(raw, dict) else raw
            meta = ClassMetadata.from_coco_categories(cats, where=str(path))
    except DataError as exc:
        raise CheckpointError(str(exc)) from None
    if (meta.num_things, meta.num_stuff) != (num_things, num_stuff):
        raise CheckpointError(f"{path}: {meta.num_things} thing / {meta.num_stuff} stuff classes, the checkpoint "
                              f"has {num_things} / {num_stuff}")
    return meta.to_dict()


def write_checkpoint(result: Conversion, out: str | Path, meta: dict[str, Any] | None, source: str) -> Path:
    """Check that the state loads strictly into ``build_model(config)``, then write it atomically."""
    import io

    from sepsnet.fileio import atomic_write_bytes
    from sepsnet.model import build_model
    from sepsnet.model.weights import FORMAT, load_model_weights

    load_model_weights(build_model(result.config), result.state, "converted state", strict=True)
    payload = {"format": FORMAT, "model": result.state, "config": result.config.to_dict(), "meta": meta,
               "iteration": 0, "converted_from": {"path": str(source), "unused": sorted(result.unused),
                                                  "random": list(result.random)}}
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)
