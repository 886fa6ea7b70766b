"""Blender (Eq. 3) against an explicit per-box bilinear-sampling reference."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from sepsnet.config import BlenderConfig, ModelConfig
from sepsnet.model.blender import Blender


def _bilinear(img: torch.Tensor, y: float, x: float) -> float:
    """torchvision RoIAlign's bilinear sample of a 2-D map (0 outside [-1, size])."""
    h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yl = yh = h - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xl = xh = w - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    return float(hy * hx * img[yl, xl] + hy * lx * img[yl, xh] + ly * hx * img[yh, xl] + ly * lx * img[yh, xh])


def _upsample_index(i: int, src: int, dst: int) -> tuple[int, int, float]:
    s = max((i + 0.5) * src / dst - 0.5, 0.0)
    i0 = int(math.floor(s))
    return i0, min(i0 + 1, src - 1), s - i0


def reference_blend(bases, rois, attention, k, m, r, scale=0.25):
    """Per-box loop: aligned RoIAlign (1 sample per bin), bilinear attention, softmax, sum."""
    out = torch.zeros(rois.shape[0], r, r, dtype=torch.float64)
    for n in range(rois.shape[0]):
        b = int(rois[n, 0])
        x1, y1, x2, y2 = [float(v) * scale - 0.5 for v in rois[n, 1:]]
        bw, bh = (x2 - x1) / r, (y2 - y1) / r
        att = attention[n].reshape(k, m, m).double()
        for i in range(r):
            yi0, yi1, ly = _upsample_index(i, m, r)
            for j in range(r):
                xj0, xj1, lx = _upsample_index(j, m, r)
                a = ((1 - ly) * (1 - lx) * att[:, yi0, xj0] + (1 - ly) * lx * att[:, yi0, xj1]
                     + ly * (1 - lx) * att[:, yi1, xj0] + ly * lx * att[:, yi1, xj1])
                a = torch.softmax(a, dim=0)
                y, x = y1 + (i + 0.5) * bh, x1 + (j + 0.5) * bw
                f = [_bilinear(bases[b, c].double(), y, x) for c in range(k)]
                out[n, i, j] = sum(float(a[c]) * f[c] for c in range(k))
    return out


def _cfg(k=3, m=5, r=12, fused=False) -> ModelConfig:
    return ModelConfig(blender=BlenderConfig(num_bases=k, attn_size=m, mask_size=r, fused=fused))


@pytest.mark.parametrize("k,m,r", [(3, 5, 12), (4, 14, 56)])
def test_blender_matches_loop_reference(k, m, r):
    g = torch.Generator().manual_seed(k)
    bases = torch.randn(2, k + 1, 20, 24, generator=g)  # + a silhouette basis, ignored
    rois = torch.tensor([[0, 4.0, 8.0, 60.0, 70.0],  # inside
                         [1, -10.0, -6.0, 30.0, 20.5],  # over the top-left border
                         [1, 70.0, 50.0, 110.0, 90.0],  # past the bottom-right border
                         [0, 33.3, 40.0, 34.0, 41.0]])  # tiny
    attn = torch.randn(4, k * m * m, generator=g)
    got = Blender.from_config(_cfg(k, m, r))(bases, rois, attn)
    assert got.shape == (4, r, r) and got.dtype == torch.float32
    ref = reference_blend(bases, rois, attn, k, m, r)
    assert torch.allclose(got.double(), ref, atol=1e-5), (got.double() - ref).abs().max()


def test_blender_zero_instances():
    out = Blender.from_config(_cfg())(torch.randn(1, 3, 8, 8), torch.zeros(0, 5), torch.zeros(0, 75))
    assert out.shape == (0, 12, 12)


def test_fused_flag_falls_back_with_a_warning_when_unavailable():
    pytest.importorskip("torch")
    try:
        from sepsnet.ops import roi_blend
        available = roi_blend.is_available()
    except ImportError:
        available = False
    bases, rois = torch.randn(1, 3, 8, 8), torch.tensor([[0, 1.0, 2.0, 20.0, 25.0]])
    attn = torch.randn(1, 75)
    plain = Blender.from_config(_cfg())(bases, rois, attn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = Blender.from_config(_cfg(fused=True))(bases, rois, attn)
    assert torch.allclose(plain, fused, atol=1e-5)
    if not available:
        assert any("roi_blend" in str(w.message) for w in caught)
