"""Box head (paper Sec. III-C, Fig. 4): FCOS on P3..P7 plus the BlendMask attention ("top layer").

One head shared by all levels: a classification tower and a box tower
(``num_convs`` x [3x3 conv, GroupNorm, ReLU]); class logits from the cls tower; box
regression, centerness and the K*M*M attention logits from the box tower (AdelaiDet
defaults: centerness on the regression branch, ``norm_reg_targets``: a learnable scale per
level, ReLU, then times the level stride so the head speaks input pixels).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sepsnet.config import ModelConfig
from sepsnet.errors import ConfigError
from sepsnet.postprocess.preselect import Preselect


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (32 for the usual widths) that
    leaves >= 2 channels per group (a 1-channel group on a 1x1 P7 map cannot be normalised)."""
    for g in range(min(max_groups, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=True),
            nn.GroupNorm(group_norm_groups(channels), channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """FCOS head with the BlendMask attention output; see module docstring."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, prior_prob: float = 0.01,
                 num_bases: int = 4, attn_size: int = 14, strides: tuple[int, ...] = (8, 16, 32, 64, 128)) -> None:
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ConfigError(f"model.fcos.prior_prob must be in (0, 1), got {prior_prob}")
        c = int(in_channels)
        self.num_classes = int(num_classes)
        self.strides = [int(s) for s in strides]
        self.num_bases = int(num_bases)
        self.attn_size = int(attn_size)
        self.attn_len = self.num_bases * self.attn_size * self.attn_size
        self.cls_tower = _tower(c, num_convs)
        self.bbox_tower = _tower(c, num_convs)
        self.cls_logits = nn.Conv2d(c, self.num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(c, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(c, 1, 3, padding=1)
        self.top_layer = nn.Conv2d(c, self.attn_len, 3, padding=1)  # BlendMask attention
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FCOSHead:
        fc = cfg.fcos
        return cls(cfg.fpn_channels, cfg.num_thing_classes, fc.num_convs, fc.prior_prob, cfg.blender.num_bases,
                   cfg.blender.attn_size, tuple(fc.strides))

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        """features P3..P7 -> per-level lists ``cls_logits`` (N,T,h,w), ``bbox_reg`` (N,4,h,w)
        l,t,r,b >= 0 in input pixels, ``centerness`` (N,1,h,w) logits, ``attention`` (N,K*M*M,h,w)."""
        if len(features) != len(self.strides):
            raise ValueError(f"FCOSHead expects {len(self.strides)} levels (P3..P7), got {len(features)}")
        out: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_reg": [], "centerness": [], "attention": []}
        for level, feat in enumerate(features):
            cls_t = self.cls_tower(feat)
            box_t = self.bbox_tower(feat)
            out["cls_logits"].append(self.cls_logits(cls_t))
            reg = F.relu(self.scales[level](self.bbox_pred(box_t)))
            out["bbox_reg"].append(reg * float(self.strides[level]))
            out["centerness"].append(self.ctrness(box_t))
            out["attention"].append(self.top_layer(box_t))
        return out


def compute_locations(features: list[Tensor], strides: list[int]) -> list[Tensor]:
    """Per level (h*w, 2) float32 (x, y) = (j*s + s//2, i*s + s//2), row-major over (i, j)."""
    locations = []
    for feat, s in zip(features, strides):
        h, w = feat.shape[-2], feat.shape[-1]
        xs = torch.arange(w, device=feat.device, dtype=torch.float32) * s + (s // 2)
        ys = torch.arange(h, device=feat.device, dtype=torch.float32) * s + (s // 2)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        locations.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return locations


def _flatten(x: Tensor) -> Tensor:
    """(N,C,h,w) -> (N,h*w,C), row-major (y, x)."""
    n, c = x.shape[0], x.shape[1]
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


#: largest k of a TensorRT TopK layer
TRT_MAX_TOPK = 3840


def _gather_locations(x: Tensor, idx: Tensor) -> Tensor:
    """x (N,l,C), idx (N,k) -> (N,k,C) with one flat Gather (no (N,k,C) index tensor)."""
    n, l, c = x.shape
    flat = idx + (torch.arange(n, device=idx.device) * l).unsqueeze(1)
    return x.reshape(n * l, c).index_select(0, flat.reshape(-1)).reshape(n, -1, c)


def preselect_level(level: dict[str, Tensor], sel: Preselect) -> dict[str, Tensor]:
    """Keep the top locations of one level by ``max_c prob * ctr`` over the classes above
    ``score_thresh`` (locations with none rank last, padding after them).

    Exact for the FCOS test-time selection (top-k (location, class) pairs by prob * ctr per
    level, prob > score_thresh): a pair in that top-k sits at a location whose best pair is at
    least as large, and if the location were not among the top-k locations, k other locations
    would each hold a distinct pair at least as large, so the pair would not be in the top-k
    (ties aside). ``select_candidates`` then runs unchanged on the kept entries.
    """
    scores, ctr = level["scores"], level["centerness"]
    num_loc = scores.shape[1]
    best = scores.amax(dim=-1)
    rank = torch.where(best > sel.score_thresh, best * ctr, torch.full_like(best, -1.0))
    if sel.padded:
        rank = torch.cat([rank, rank.new_full((rank.shape[0], sel.topk), -2.0)], dim=1)
        idx = rank.topk(sel.topk, dim=1).indices
        real = idx < num_loc  # Less/Where, not a Clip with a computed bound (TensorRT-friendly)
        idx = torch.where(real, idx, torch.zeros_like(idx))  # padding copies location 0 ...
        keep = real.to(scores.dtype)  # ... with zero class scores: never a candidate
    else:
        idx = rank.topk(min(sel.topk, int(num_loc)), dim=1).indices
        keep = None
    out = {k: _gather_locations(v, idx) for k, v in level.items() if k != "centerness"}
    out["centerness"] = _gather_locations(ctr.unsqueeze(-1), idx).squeeze(-1)
    if keep is not None:
        out["scores"] = out["scores"] * keep.unsqueeze(-1)
    return out


def dense_predictions(outputs: dict[str, list[Tensor]], locations: list[Tensor],
                      preselect: Preselect | None = None) -> dict[str, Tensor]:
    """Head outputs -> (N,L,...) tensors over P3..P7: ``boxes`` xyxy (location -/+ ltrb),
    ``scores`` sigmoid (N,L,T), ``centerness`` sigmoid (N,L), ``attention`` raw (N,L,K*M*M).

    With ``preselect`` each level keeps only ``min(topk, h*w)`` (``padded``: ``topk``) locations
    (:func:`preselect_level`), level after level as before, so L = the sum of those counts."""
    levels = []
    for lvl, loc in enumerate(locations):
        reg = _flatten(outputs["bbox_reg"][lvl])  # (N,l,4)
        loc = loc.to(reg.dtype).unsqueeze(0)
        level = {
            "boxes": torch.cat([loc - reg[..., :2], loc + reg[..., 2:]], dim=-1),
            "scores": _flatten(outputs["cls_logits"][lvl]).sigmoid(),
            "centerness": _flatten(outputs["centerness"][lvl]).squeeze(-1).sigmoid(),
            "attention": _flatten(outputs["attention"][lvl]),
        }
        levels.append(preselect_level(level, preselect) if preselect is not None else level)
    return {k: torch.cat([lv[k] for lv in levels], dim=1) for k in ("boxes", "scores", "centerness", "attention")}
