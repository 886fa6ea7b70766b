"""Fused ROIAlign + blend op (cpp_plugins/roi_blend) against the unfused definition (paper Eq. 3)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from sepsnet.errors import NotBuiltError
from sepsnet.ops import roi_blend as rb

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _built():
    rb.load()  # a failed build is a test error (NotBuiltError names the compiler log), not a skip


def unfused(bases, rois, attention, out_size, scale, sr):
    """The blender by definition: roi_align(aligned) + bilinear upsampling + softmax + sum."""
    crops = roi_align(bases, rois, (out_size, out_size), scale, sr, aligned=True)
    attn = F.interpolate(attention, size=(out_size, out_size), mode="bilinear", align_corners=False)
    return (crops * attn.softmax(dim=1)).sum(dim=1)


def make(n=7, batch=2, k=4, h=20, w=36, m=14, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(batch, k, h, w, generator=g)
    attention = torch.randn(n, k, m, m, generator=g) * 2
    size = torch.tensor([w * 4.0, h * 4.0])
    xy = torch.rand(n, 2, generator=g) * size * 1.2 - 0.1 * size  # some start outside
    wh = torch.rand(n, 2, generator=g) * size * 0.6
    idx = torch.randint(0, batch, (n, 1), generator=g).float()
    rois = torch.cat([idx, xy, xy + wh], dim=1)
    return bases.to(device), rois.to(device), attention.to(device)


def check(bases, rois, attention, out_size=56, scale=0.25, sr=1, tol=TOL):
    got = rb.roi_blend(bases, rois, attention, out_size, scale, sr)
    want = unfused(bases, rois, attention, out_size, scale, sr)
    assert got.shape == want.shape == (rois.shape[0], out_size, out_size)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    return got


@pytest.mark.parametrize("sr", [1, 2, 0])
@pytest.mark.parametrize("k", [1, 4])
def test_random_matches_unfused(k, sr):
    check(*make(k=k, seed=k * 10 + sr), sr=sr)


def test_non_square_bases_batch_and_sizes():
    bases, rois, attention = make(n=5, batch=3, h=9, w=31, m=7, seed=3)
    check(bases, rois, attention, out_size=28, scale=0.25)
    check(bases, rois, attention, out_size=13, scale=0.5, sr=2)


def test_boxes_outside_zero_size_and_degenerate():
    bases, _, attention = make(n=6, batch=2, h=16, w=24, seed=4)
    W, H = 24 * 4.0, 16 * 4.0
    rois = torch.tensor([
        [0, -30.0, -20.0, 20.0, 30.0],       # partly outside (top-left)
        [1, W - 10, H - 8, W + 40, H + 50],   # partly outside (bottom-right)
        [0, W + 20, H + 20, W + 90, H + 70],  # fully outside: every sample is zero
        [1, 10.0, 12.0, 10.0, 12.0],          # zero-size box
        [0, 30.0, 5.0, 30.0, 40.0],           # zero width
        [1, 40.0, 30.0, 20.0, 10.0],          # x2 < x1, y2 < y1
    ])
    out = check(bases, rois, attention)
    assert out[2].abs().max() == 0
    check(bases, rois, attention, sr=2)
    check(bases, rois, attention, sr=0)


def test_zero_instances():
    bases, _, _ = make()
    out = check(bases, torch.zeros(0, 5), torch.zeros(0, 4, 14, 14))
    assert out.shape == (0, 56, 56)


def test_dtypes_and_layouts():
    bases, rois, attention = make(seed=5)
    want = unfused(bases, rois, attention, 56, 0.25, 1)
    got64 = rb.roi_blend(bases.double(), rois.double(), attention.double(), 56, 0.25, 1)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64.float(), want, atol=TOL, rtol=0)
    got16 = rb.roi_blend(bases.half(), rois, attention.half(), 56, 0.25, 1)
    assert got16.dtype == torch.float16
    torch.testing.assert_close(got16.float(), want, atol=2e-2, rtol=0)
    wide = torch.randn(2, 6, 20, 36)
    wide[:, :4] = bases  # non-contiguous slice, as the model passes bases[:, :K]
    torch.testing.assert_close(rb.roi_blend(wide[:, :4], rois, attention), want, atol=TOL, rtol=0)


def test_grad_falls_back_and_raw_op_is_inference_only():
    bases, rois, attention = make(n=3, seed=6)
    attention.requires_grad_(True)
    out = rb.roi_blend(bases, rois, attention)
    out.sum().backward()
    assert attention.grad is not None and attention.grad.abs().sum() > 0
    raw = torch.ops.sepsnet.roi_blend(bases, rois, attention.detach().requires_grad_(True), 56, 0.25, 1)
    with pytest.raises(RuntimeError, match="inference only"):
        raw.sum().backward()


def test_bad_inputs_raise_clear_errors():
    bases, rois, attention = make(n=3)
    with pytest.raises(ValueError, match="rois must be"):
        rb.roi_blend(bases, rois[:, :4], attention)
    with pytest.raises(ValueError, match="attention must be"):
        rb.roi_blend(bases, rois, attention[:, :2])
    with pytest.raises(ValueError, match="bases must be"):
        rb.roi_blend(bases[0], rois, attention)
    with pytest.raises(RuntimeError, match="batch index"):
        bad = rois.clone()
        bad[0, 0] = 5
        rb.roi_blend(bases, bad, attention)


def test_non_finite_rois_raise_on_cpu():
    bases, rois, attention = make(n=3, seed=12)
    for j, value in [(1, float("nan")), (4, float("inf")), (2, float("-inf")), (0, float("nan"))]:
        bad = rois.clone()
        bad[1, j] = value
        what = "batch index" if j == 0 else "coordinate"
        for call in (rb.roi_blend, torch.ops.sepsnet.roi_blend):  # the wrapper and the raw op
            args = (56, 0.25, 1) if call is torch.ops.sepsnet.roi_blend else ()
            with pytest.raises(RuntimeError, match=rf"roi 1 has a non-finite {what} \((nan|inf|-inf)\)"):
                call(bases, bad, attention, *args)
    check(bases, rois, attention)  # finite rois still work after the errors


def _spy(monkeypatch, owner, name):
    """Wrap ``owner.name`` so the test sees every call (the result is the real one)."""
    calls = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_blender_module_uses_fused_op(monkeypatch):
    from sepsnet.config import ModelConfig
    from sepsnet.model.blender import Blender, blend
    cfg = ModelConfig()
    cfg.blender.fused = True
    bases, rois, attention = make(n=4, seed=8)
    extra = torch.cat([bases, torch.randn(2, 1, 20, 36)], dim=1)  # + silhouette basis
    wrapper = _spy(monkeypatch, rb, "roi_blend")
    native = _spy(monkeypatch, torch.ops.sepsnet, "roi_blend")
    with torch.no_grad():
        got = Blender.from_config(cfg)(extra, rois, attention.flatten(1))
    assert len(wrapper) == 1 and len(native) == 1, "blender.fused=True must run the native op"
    assert native[0][0].shape == bases.shape  # only the K blend bases, not the silhouette basis
    torch.testing.assert_close(got, blend(bases, rois, attention, 56, 0.25, 1), atol=TOL, rtol=0)
    cfg.blender.fused = False
    with torch.no_grad():
        Blender.from_config(cfg)(extra, rois, attention.flatten(1))
    assert len(wrapper) == 1 and len(native) == 1, "blender.fused=False must not use the native op"


@pytest.mark.skipif(not torch.cuda.is_available() or not rb.is_available("cuda"), reason="no GPU / CUDA op")
@pytest.mark.parametrize("sr", [1, 2])
def test_cuda_matches_unfused(sr):
    bases, rois, attention = make(n=9, batch=3, h=15, w=33, seed=9, device="cuda")
    check(bases, rois, attention, sr=sr)
    check(*make(n=4, k=1, seed=10, device="cuda"), sr=sr)
    rois_edge = torch.tensor([[0, -30.0, -20.0, 20.0, 30.0], [1, 10.0, 12.0, 10.0, 12.0],
                              [2, 500.0, 500.0, 600.0, 600.0]], device="cuda")
    check(bases, rois_edge, attention[:3], sr=sr)
    check(bases, torch.zeros(0, 5, device="cuda"), torch.zeros(0, 4, 14, 14, device="cuda"))
    want = unfused(bases, rois, attention, 56, 0.25, sr)
    got16 = rb.roi_blend(bases.half(), rois, attention.half(), 56, 0.25, sr)
    torch.testing.assert_close(got16.float(), want, atol=2e-2, rtol=0)


def test_missing_sources_raise_not_built(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(rb, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(rb, "_state", {"loaded": False, "cuda": False, "error": None})
    with pytest.raises(NotBuiltError, match="sources not found"):
        rb.load()
    assert rb.is_available() is False


def test_build_failure_raises_not_built_with_log(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("torch_op.cpp", "roi_blend_cpu.cpp"):
        (src / name).write_text('#error "deliberately broken"\n')
    code = textwrap.dedent("""
        from sepsnet.errors import NotBuiltError
        from sepsnet.ops import roi_blend as rb
        assert rb.is_available() is False
        try:
            rb.load()
        except NotBuiltError as exc:
            print("MSG", exc)
    """)
    env = dict(os.environ, SEPSNET_ROI_BLEND_SRC=str(src), SEPSNET_BUILD_DIR=str(tmp_path / "build"),
               SEPSNET_ROI_BLEND_CUDA="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    msg = res.stdout.split("MSG", 1)[1]
    log = Path(msg.split("compiler output: ", 1)[1].strip())
    assert log.is_file() and "deliberately broken" in log.read_text()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_builds_selftest_and_handles_missing_tensorrt(tmp_path: Path):
    build = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", str(rb.SOURCE_DIR), "-B", str(build)], capture_output=True, text=True,
                         timeout=180)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "skipping" in cfg.stdout or "sepsnet_plugins: TensorRT" in cfg.stdout
    made = subprocess.run(["cmake", "--build", str(build), "--target", "roi_blend_selftest"], capture_output=True,
                          text=True, timeout=180)
    assert made.returncode == 0, made.stdout + made.stderr
    run = subprocess.run([str(build / "roi_blend_selftest")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout


def test_fused_blender_trains_through_the_pytorch_path(monkeypatch):
    """The fused op has no backward: with gradients needed the Blender must not use it."""
    from sepsnet.config import ModelConfig
    from sepsnet.model.blender import Blender, blend
    cfg = ModelConfig()
    cfg.blender.fused = True
    bases, rois, attention = make(n=3, seed=11)
    bases.requires_grad_(True)
    attn = attention.flatten(1).clone().requires_grad_(True)
    wrapper = _spy(monkeypatch, rb, "roi_blend")
    native = _spy(monkeypatch, torch.ops.sepsnet, "roi_blend")
    out = Blender.from_config(cfg)(bases, rois, attn)
    out.sum().backward()
    assert not wrapper and not native, "the inference-only fused op ran although gradients were needed"
    assert bases.grad is not None and attn.grad is not None and torch.isfinite(attn.grad).all()
    with torch.no_grad():  # the same module, no gradients needed: now it is fused
        Blender.from_config(cfg)(bases, rois, attn)
    assert len(native) == 1
    torch.testing.assert_close(out.detach(), blend(bases.detach(), rois, attention, 56, 0.25, 1), atol=TOL, rtol=0)
