"""Blender (paper Sec. III-F, Eq. 3, Fig. 6; BlendMask defaults).

For each instance i: F_i = RoIAlign(bases[:, :K], box_i) to R x R; the attention logits
(K*M*M) are reshaped to (K,M,M), upsampled bilinearly to R x R (align_corners=False) and
normalised with a softmax over K to S_i; the mask logits are M_i = sum_k S_i^k * F_i^k.

Coordinate convention (``aligned=True``): pixel centres sit at +0.5, so an input-pixel box
coordinate x maps to the continuous feature coordinate x * spatial_scale - 0.5 (scale 1/4 for
the bases), and bin j of R samples at x1' + (j + 0.5) * (x2' - x1') / R (sampling ratio 1).
ONNX: RoiAlign with coordinate_transformation_mode=half_pixel, which TensorRT maps to
ROIAlign_TRT. The fused ``sepsnet.ops.roi_blend`` kernel computes the same thing.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from sepsnet.config import ModelConfig

BASES_SCALE = 0.25


def blend(bases: Tensor, rois: Tensor, attention: Tensor, out_size: int,
          spatial_scale: float = BASES_SCALE, sampling_ratio: int = 1) -> Tensor:
    """Eq. 3 in plain PyTorch: bases (N,K,h,w), rois (n,5), attention (n,K,M,M) -> (n,R,R)."""
    crops = roi_align(bases, rois.to(bases.dtype), (out_size, out_size), spatial_scale,
                      sampling_ratio, aligned=True)  # (n,K,R,R)
    attn = F.interpolate(attention.to(bases.dtype), size=(out_size, out_size), mode="bilinear",
                         align_corners=False).softmax(dim=1)
    return (crops * attn).sum(dim=1)


class Blender(nn.Module):
    """Parameter-free blender; uses the fused op when ``blender.fused`` and it is built.

    The fused op is inference only (no backward): whenever autograd would need gradients
    through the blend (training, or any input requiring grad) the PyTorch path runs instead.
    """

    def __init__(self, num_bases: int, attn_size: int, mask_size: int, sampling_ratio: int = 1,
                 fused: bool = False) -> None:
        super().__init__()
        self.num_bases, self.attn_size, self.mask_size = num_bases, attn_size, mask_size
        self.sampling_ratio = sampling_ratio
        self.fused = fused
        self._warned = False

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Blender:
        b = cfg.blender
        return cls(b.num_bases, b.attn_size, b.mask_size, b.sampling_ratio, b.fused)

    def _fused_op(self):  # -> module or None
        if not self.fused or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return None
        try:
            from sepsnet.ops import roi_blend  # lazy: optional native op
            if roi_blend.is_available():
                return roi_blend
            reason = "roi_blend.is_available() is False"
        except ImportError as exc:
            reason = str(exc)
        if not self._warned:
            warnings.warn(f"model.blender.fused is set but the fused roi_blend op is unavailable "
                          f"({reason}); using the PyTorch blender", RuntimeWarning, stacklevel=3)
            self._warned = True
        return None

    def forward(self, bases: Tensor, rois: Tensor, attention: Tensor) -> Tensor:
        """bases (N,K+B,h,w) (only the first K blend), rois (n,5) [b,x1,y1,x2,y2] input pixels,
        attention (n,K*M*M) logits -> mask logits (n,R,R)."""
        k, m = self.num_bases, self.attn_size
        attn = attention.reshape(-1, k, m, m)
        blend_bases = bases[:, :k]
        needs_grad = torch.is_grad_enabled() and (bases.requires_grad or attention.requires_grad)
        op = None if needs_grad else self._fused_op()
        if op is not None:
            return op.roi_blend(blend_bases.contiguous(), rois, attn.contiguous(), self.mask_size,
                                BASES_SCALE, self.sampling_ratio)
        return blend(blend_bases, rois, attn, self.mask_size, BASES_SCALE, self.sampling_ratio)
