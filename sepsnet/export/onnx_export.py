"""Export the deploy model as two ONNX graphs (DESIGN.md "Inference split").

``dense.onnx``: image (N,3,H,W) -> boxes, scores, centerness, attention, bases, p3, stuff_logits;
the per-location outputs hold only the top ``pre_nms_topk`` locations of each FPN level
(:func:`dense_preselect`; at 1024x2048 the attention output shrinks from 137 MB to 16 MB).
``instance.onnx``: bases, p3, rois (n,5), attention (n,K*M*M) -> mask_probs (Eq. 3 blend),
iou_score, silhouette_score, with a dynamic instance count ``instances``.
Static H/W/batch by default; ``dynamic=True`` makes batch/height/width dynamic too.
``torch.onnx.export`` (dynamo exporter) maps ``torchvision.ops.roi_align`` to ONNX ``RoiAlign``
and ``torchvision.ops.deform_conv2d`` (deformable backbones) to ONNX ``DeformConv``, an opset-19
operator: such models export at opset 19 (:func:`opset_for`); every export is followed by a
graphsurgeon clean-up and assertions (see ``surgery``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import EngineError
from sepsnet.export import surgery
from sepsnet.model.fcos_head import TRT_MAX_TOPK, Preselect

OPSET = 18  # >= 17; 18 is the lowest opset the dynamo exporter implements natively
DEFORM_OPSET = 19  # ONNX DeformConv exists from opset 19 on
DENSE_INPUTS = ("image",)
DENSE_OUTPUTS = ("boxes", "scores", "centerness", "attention", "bases", "p3", "stuff_logits")
INSTANCE_INPUTS = ("bases", "p3", "rois", "attention")
INSTANCE_OUTPUTS = ("mask_probs", "iou_score", "silhouette_score")
EXAMPLE_INSTANCES = 3


@dataclass
class ExportShape:
    """Input size of the exported graphs and, with ``dynamic``, the ranges (multiples of 32)."""

    height: int
    width: int
    batch: int = 1
    dynamic: bool = False
    min_hw: int = 64
    max_hw: int = 1344
    max_batch: int = 4
    max_instances: int = 100

    def ranges(self) -> dict[str, list[int]]:
        """[min, opt, max] per dynamic axis, as the manifest and TensorRT profiles use them."""
        if not self.dynamic:
            return {"batch": [self.batch] * 3, "height": [self.height] * 3, "width": [self.width] * 3}
        return {"batch": [1, self.batch, self.max_batch],
                "height": [self.min_hw, self.height, self.max_hw],
                "width": [self.min_hw, self.width, self.max_hw]}


def trace_size(shape: ExportShape) -> tuple[int, int, int]:
    """(batch, H, W) of the example input used for tracing.

    With dynamic dims, torch.export specialises any size that is 1 in the example (P7 of a small
    image is 1x1) and may unify equal sizes; so trace with batch 2 and every pyramid level > 1."""
    if not shape.dynamic:
        return shape.batch, shape.height, shape.width
    h = min(max(shape.height, 160), shape.max_hw)
    w = min(max(shape.width, 192), shape.max_hw)
    if w == h:
        w = w - 32 if w - 32 >= shape.min_hw else w + 32
    return max(2, shape.batch), h, w


def ceil32(v: int) -> int:
    return int(math.ceil(v / 32) * 32)


def default_shape(cfg: SEPSNetConfig, height: int | None = None, width: int | None = None,
                  dynamic: bool = False, max_batch: int = 4) -> ExportShape:
    """Static size: the padded test size of the config (landscape) unless given; multiples of 32."""
    d = cfg.data
    h = height if height is not None else ceil32(d.min_size_test)
    w = width if width is not None else ceil32(d.max_size_test)
    for name, v in (("height", h), ("width", w)):
        if v <= 0 or v % 32:
            raise EngineError(f"--{name} must be a positive multiple of 32 (network stride), got {v}")
    max_hw = max(ceil32(d.max_size_test), h, w)
    return ExportShape(height=h, width=w, batch=1, dynamic=dynamic, max_hw=max_hw, max_batch=max_batch,
                       max_instances=cfg.postprocess.max_instances)


def dense_preselect(cfg: SEPSNetConfig, dynamic: bool = False) -> Preselect:
    """The per-level pre-selection baked into ``dense.onnx``: the config's ``pre_nms_topk`` and
    ``score_thresh`` (recorded in the manifest as ``preselect``); padded levels for a dynamic
    export, whose level sizes are unknown when TensorRT fixes TopK's k."""
    pp = cfg.postprocess
    if pp.pre_nms_topk > TRT_MAX_TOPK:
        raise EngineError(f"postprocess.pre_nms_topk={pp.pre_nms_topk} is above {TRT_MAX_TOPK}, the largest k "
                          "of a TensorRT TopK layer; lower it for export")
    return Preselect(topk=int(pp.pre_nms_topk), score_thresh=float(pp.score_thresh), padded=dynamic)


class DenseGraph(torch.nn.Module):
    """image -> the dense outputs as a tuple in ``DENSE_OUTPUTS`` order."""

    def __init__(self, model: torch.nn.Module, preselect: Preselect | None = None) -> None:
        super().__init__()
        self.model = model
        self.preselect = preselect

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_dense(image, self.preselect)
        return tuple(out[k] for k in DENSE_OUTPUTS)


class InstanceGraph(torch.nn.Module):
    """(bases, p3, rois, attention) -> instance outputs as a tuple in ``names`` order."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, bases: torch.Tensor, p3: torch.Tensor, rois: torch.Tensor,
                attention: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_instances(bases, p3, rois, attention)
        return tuple(out[k] for k in self.names)


def example_rois(n: int, batch: int, height: int, width: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random valid rois [batch_index, x1, y1, x2, y2] in input pixels."""
    g = generator
    b = torch.randint(0, batch, (n, 1), generator=g).float()
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
    wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([width * 0.4, height * 0.4])
    return torch.cat([b, xy, xy + wh], dim=1)


def has_deform(cfg: SEPSNetConfig) -> bool:
    """Whether the model holds deformable convolutions (``model.backbone.deform_on_per_stage``)."""
    return any(cfg.model.backbone.deform_on_per_stage)


def opset_for(cfg: SEPSNetConfig) -> int:
    """The opset both graphs of this model are exported at: :data:`OPSET`, or :data:`DEFORM_OPSET` for a
    deformable backbone."""
    return DEFORM_OPSET if has_deform(cfg) else OPSET


def _check_opset(cfg: SEPSNetConfig, opset: int | None) -> int:
    """The opset to use; EngineError when it cannot hold this model's operators."""
    if opset is None:
        return opset_for(cfg)
    if has_deform(cfg) and opset < DEFORM_OPSET:
        raise EngineError(f"the model has deformable convolutions (model.backbone.deform_on_per_stage "
                          f"{cfg.model.backbone.deform_on_per_stage}); ONNX DeformConv needs opset >= "
                          f"{DEFORM_OPSET}, asked for {opset}")
    return opset


def _run_export(module: torch.nn.Module, args: tuple, input_names: tuple, output_names: tuple,
                dynamic_shapes: tuple | None, opset: int, where: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, None, input_names=list(input_names),
                                        output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, dynamo=True, optimize=True, verbose=False)
        except Exception as exc:
            if opset >= DEFORM_OPSET and "deform" in str(exc).lower():
                raise EngineError(f"{where}: this torch ({torch.__version__}) cannot export the deformable "
                                  f"convolutions (torchvision deform_conv2d -> ONNX DeformConv): "
                                  f"{type(exc).__name__}") from exc
            raise EngineError(f"{where}: torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
    return program.model_proto


def _dense_dynamic(shape: ExportShape) -> tuple | None:
    if not shape.dynamic:
        return None
    from torch.export import Dim

    hb = Dim("height_div32", min=max(1, shape.min_hw // 32), max=shape.max_hw // 32)
    wb = Dim("width_div32", min=max(1, shape.min_hw // 32), max=shape.max_hw // 32)
    batch = Dim("batch", min=1, max=shape.max_batch)
    return ({0: batch, 2: 32 * hb, 3: 32 * wb},)


def export_dense(model: torch.nn.Module, cfg: SEPSNetConfig, path: str | Path, shape: ExportShape,
                 opset: int | None = None, preselect: Preselect | None = None) -> onnx.ModelProto:
    """Export, clean and check ``dense.onnx``; returns the saved model. ``preselect`` (usually
    :func:`dense_preselect`) keeps the top-k locations per level; None keeps every location.
    ``opset`` None: :func:`opset_for` the model."""
    opset = _check_opset(cfg, opset)
    batch, h, w = trace_size(shape)
    image = torch.randn(batch, 3, h, w)
    proto = _run_export(DenseGraph(model, preselect).eval(), (image,), DENSE_INPUTS, DENSE_OUTPUTS,
                        _dense_dynamic(shape), opset, "dense graph")
    proto = surgery.clean_graph(proto, cfg.model.blender.sampling_ratio)
    surgery.assert_constant_topk(proto, "dense graph")
    if shape.dynamic:
        surgery.assert_dynamic(proto, {"image": (0, 2, 3)}, "dense graph")
    else:
        surgery.assert_static(proto, "dense graph")
    surgery.save(proto, path)
    return proto


def instance_output_names(cfg: SEPSNetConfig) -> tuple[str, ...]:
    """The instance outputs this model produces (IoU/silhouette only with ``mask_score``)."""
    names = ("mask_probs",)
    if cfg.model.components.mask_score:
        names += ("iou_score", "silhouette_score")
    return names


def instance_examples(model: torch.nn.Module, shape: ExportShape, n: int = EXAMPLE_INSTANCES,
                      seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(bases, p3, rois, attention) example inputs: real dense outputs of a random image."""
    g = torch.Generator().manual_seed(seed)
    batch, h, w = trace_size(shape)
    with torch.no_grad():
        dense = model.forward_dense(torch.randn(batch, 3, h, w, generator=g))
    rois = example_rois(n, batch, h, w, g)
    attention = dense["attention"][0, :n].contiguous() if dense["attention"].shape[1] >= n else \
        torch.randn(n, dense["attention"].shape[2], generator=g)
    return dense["bases"], dense["p3"], rois, attention


def _instance_dynamic(shape: ExportShape) -> tuple:
    from torch.export import Dim

    n = Dim("instances", min=0, max=max(shape.max_instances, 2) * max(shape.max_batch, 1) * 4)
    if not shape.dynamic:
        return (None, None, {0: n}, {0: n})
    batch = Dim("batch", min=1, max=shape.max_batch)
    bh = Dim("bases_height", min=1, max=shape.max_hw // 4)
    bw = Dim("bases_width", min=1, max=shape.max_hw // 4)
    ph = Dim("p3_height", min=1, max=shape.max_hw // 8)
    pw = Dim("p3_width", min=1, max=shape.max_hw // 8)
    return ({0: batch, 2: bh, 3: bw}, {0: batch, 2: ph, 3: pw}, {0: n}, {0: n})


def export_instance(model: torch.nn.Module, cfg: SEPSNetConfig, path: str | Path, shape: ExportShape,
                    opset: int | None = None) -> onnx.ModelProto:
    """Export, clean and check ``instance.onnx`` (dynamic instance count); returns the saved model.
    ``opset`` None: :func:`opset_for` the model (both graphs of a bundle share one opset)."""
    opset = _check_opset(cfg, opset)
    names = instance_output_names(cfg)
    args = instance_examples(model, shape)
    proto = _run_export(InstanceGraph(model, names).eval(), args, INSTANCE_INPUTS, names,
                        _instance_dynamic(shape), opset, "instance graph")
    sr = cfg.model.blender.sampling_ratio
    proto = surgery.clean_graph(proto, sr)
    surgery.assert_roi_align(proto, sr, "instance graph")
    if not surgery.roi_align_nodes(proto):
        raise EngineError("instance graph: no RoiAlign node after export (torchvision roi_align was not mapped)")
    expected = {"rois": (0,), "attention": (0,)}
    if shape.dynamic:
        expected.update({"bases": (0, 2, 3), "p3": (0, 2, 3)})
    surgery.assert_dynamic(proto, expected, "instance graph")
    surgery.save(proto, path)
    return proto
