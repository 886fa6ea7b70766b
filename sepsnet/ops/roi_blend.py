"""Fused ROIAlign + attention blend (paper Eq. 3, Sec. III-F; BlendMask blender) as a native op.

``roi_blend(bases, rois, attention, out_size, spatial_scale, sampling_ratio)`` returns the same
(n, R, R) mask logits as the unfused blender: torchvision ``roi_align(aligned=True)`` of the bases,
attention upsampled bilinearly (align_corners=False), softmax over K, product, sum over K. The
kernel lives in ``cpp_plugins/roi_blend`` and is JIT-built with ``torch.utils.cpp_extension``
on first use (CPU always; CUDA sources only when a GPU and nvcc are present), cached under
``$SEPSNET_BUILD_DIR`` or ``~/.cache/sepsnet``. Inference only: when gradients are needed the
wrapper computes the unfused (differentiable) blend instead.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from sepsnet.errors import NotBuiltError

OP_NAME = "sepsnet::roi_blend"
SOURCE_DIR = Path(os.environ.get("SEPSNET_ROI_BLEND_SRC",
                                  Path(__file__).resolve().parents[2] / "cpp_plugins" / "roi_blend"))
_CPU_SOURCES = ("torch_op.cpp", "roi_blend_cpu.cpp")
_CUDA_SOURCES = ("roi_blend_cuda.cu",)

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "cuda": False, "error": None}


def _want_cuda() -> bool:
    """CUDA sources are compiled only with a usable GPU, a CUDA torch and nvcc."""
    forced = os.environ.get("SEPSNET_ROI_BLEND_CUDA")
    if forced is not None:
        return forced == "1"
    if not (torch.cuda.is_available() and torch.version.cuda):
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()


def build_dir(with_cuda: bool) -> Path:
    """Cache folder of the JIT build (one per torch version and CPU/CUDA flavour)."""
    root = Path(os.environ.get("SEPSNET_BUILD_DIR", Path.home() / ".cache" / "sepsnet"))
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info[0]}{sys.version_info[1]}"
    return root / "roi_blend" / f"{tag}_{'cuda' if with_cuda else 'cpu'}"


def _cuda_paths() -> tuple[list[str], list[str]]:
    """Include/library folders of the CUDA toolkit when CUDA_HOME's own layout lacks them
    (e.g. nvcc linked into /usr/local/bin while the toolkit lives in /usr/local/cuda)."""
    from torch.utils.cpp_extension import CUDA_HOME
    roots = [Path(CUDA_HOME)] if CUDA_HOME else []
    roots += [Path(p) for p in ("/usr/local/cuda",) if Path(p).is_dir()]
    incs = [d for r in roots for d in [r / "include", *sorted(r.glob("targets/*/include"))]
            if (d / "cuda_runtime_api.h").is_file()]
    libs = [d for r in roots for d in [r / "lib64", r / "lib", *sorted(r.glob("targets/*/lib"))]
            if any(d.glob("libcudart.so*"))]
    return [str(incs[0])] if incs else [], [f"-L{libs[0]}"] if libs else []


def _ensure_ninja_on_path() -> None:
    if shutil.which("ninja"):
        return
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]
        extra.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])


def _register_python_side() -> None:
    """Fake (shape) kernel for torch.compile/export and an 'inference only' backward."""
    def _fake(bases, rois, attention, out_size, spatial_scale, sampling_ratio):
        return bases.new_empty((rois.shape[0], out_size, out_size))

    def _backward(ctx, grad):
        raise RuntimeError("sepsnet::roi_blend is inference only (no backward); call "
                           "sepsnet.ops.roi_blend.roi_blend, which uses the differentiable "
                           "unfused blender when gradients are required")

    torch.library.register_fake(OP_NAME)(_fake)
    torch.library.register_autograd(OP_NAME, _backward)


def load(verbose: bool = False) -> None:
    """Build (or reuse the cached build of) the extension and register the op.

    Raises NotBuiltError naming the build log when compilation fails."""
    with _lock:
        if _state["loaded"]:
            return
        if _state["error"] is not None:
            raise NotBuiltError(str(_state["error"]))
        with_cuda = _want_cuda()
        sources = [SOURCE_DIR / s for s in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())]
        missing = [str(s) for s in sources if not s.is_file()]
        if missing:
            _state["error"] = f"roi_blend sources not found: {', '.join(missing)} (set SEPSNET_ROI_BLEND_SRC)"
            raise NotBuiltError(str(_state["error"]))
        bdir = build_dir(with_cuda)
        bdir.mkdir(parents=True, exist_ok=True)
        _ensure_ninja_on_path()
        from torch.utils import cpp_extension
        cuda_inc, cuda_lib = _cuda_paths() if with_cuda else ([], [])
        # -fopenmp: at::parallel_for is inline OpenMP (the process already has torch's libgomp)
        flags = ["-O3", "-fno-trapping-math", "-fopenmp"] + (["-DSEPSNET_WITH_CUDA"] if with_cuda else [])
        try:
            cpp_extension.load(name=f"sepsnet_roi_blend_{'cuda' if with_cuda else 'cpu'}",
                               sources=[str(s) for s in sources], extra_cflags=flags,
                               extra_cuda_cflags=["-O3", "-DSEPSNET_WITH_CUDA"],
                               extra_ldflags=["-fopenmp"] + cuda_lib,
                               extra_include_paths=[str(SOURCE_DIR)] + cuda_inc, build_directory=str(bdir),
                               with_cuda=with_cuda, is_python_module=False, verbose=verbose)
        except Exception as exc:  # compiler/linker/ninja failures surface as RuntimeError/OSError
            log = bdir / "build_error.log"
            try:
                log.write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
            except OSError:
                log = bdir
            _state["error"] = (f"building the fused roi_blend op failed ({type(exc).__name__}); "
                               f"compiler output: {log}")
            raise NotBuiltError(str(_state["error"])) from None
        _register_python_side()
        _state["loaded"], _state["cuda"] = True, with_cuda


def is_available(device: str | None = None) -> bool:
    """True when the op is built (building it on first call); with ``device='cuda'`` it must
    also have CUDA kernels."""
    try:
        load()
    except NotBuiltError:
        return False
    return not (device is not None and torch.device(device).type == "cuda" and not _state["cuda"])


def roi_blend_reference(bases: Tensor, rois: Tensor, attention: Tensor, out_size: int,
                        spatial_scale: float, sampling_ratio: int) -> Tensor:
    """The unfused definition (differentiable): roi_align + interpolate + softmax + sum."""
    crops = roi_align(bases, rois.to(bases.dtype), (out_size, out_size), spatial_scale,
                      sampling_ratio, aligned=True)
    attn = F.interpolate(attention.to(bases.dtype), size=(out_size, out_size), mode="bilinear",
                         align_corners=False).softmax(dim=1)
    return (crops * attn).sum(dim=1)


def _check(bases: Tensor, rois: Tensor, attention: Tensor, out_size: int, sampling_ratio: int) -> None:
    if bases.dim() != 4:
        raise ValueError(f"roi_blend: bases must be (N, K, H, W), got {tuple(bases.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"roi_blend: rois must be (n, 5) [batch, x1, y1, x2, y2], got {tuple(rois.shape)}")
    if attention.dim() != 4 or attention.shape[2] != attention.shape[3] or \
            attention.shape[:2] != (rois.shape[0], bases.shape[1]):
        raise ValueError(f"roi_blend: attention must be (n={rois.shape[0]}, K={bases.shape[1]}, M, M), "
                         f"got {tuple(attention.shape)}")
    if out_size < 1 or sampling_ratio < 0:
        raise ValueError(f"roi_blend: out_size must be >= 1 and sampling_ratio >= 0, "
                         f"got {out_size}, {sampling_ratio}")
    if bases.device != rois.device or bases.device != attention.device:
        raise ValueError(f"roi_blend: bases ({bases.device}), rois ({rois.device}) and attention "
                         f"({attention.device}) must be on one device")


def roi_blend(bases: Tensor, rois: Tensor, attention: Tensor, out_size: int = 56,
              spatial_scale: float = 0.25, sampling_ratio: int = 1) -> Tensor:
    """bases (N,K,h,w), rois (n,5) input pixels, attention (n,K,M,M) logits -> (n,R,R) logits."""
    _check(bases, rois, attention, out_size, sampling_ratio)
    if torch.is_grad_enabled() and (bases.requires_grad or attention.requires_grad):
        return roi_blend_reference(bases, rois, attention, out_size, spatial_scale, sampling_ratio)
    load()
    if bases.is_cuda and not _state["cuda"]:
        raise NotBuiltError("roi_blend: the op was built without CUDA kernels (no GPU or nvcc at build "
                            f"time; build dir {build_dir(False)}); got CUDA tensors")
    dtype = bases.dtype
    native = (torch.float32, torch.float16) if bases.is_cuda else (torch.float32, torch.float16, torch.bfloat16)
    work = dtype if dtype in native else torch.float32
    out = torch.ops.sepsnet.roi_blend(bases.to(work).contiguous(), rois.to(torch.float32).contiguous(),
                                      attention.to(work).contiguous(), int(out_size),
                                      float(spatial_scale), int(sampling_ratio))
    return out.to(dtype)
