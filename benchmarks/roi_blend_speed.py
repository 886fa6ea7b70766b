"""Fused roi_blend op vs the unfused torchvision chain (paper Eq. 3 blender).

100 instances, K=4 bases at 1/4 of 1024x2048 (256x512), 14x14 attention, 56x56 output,
sampling ratio 1; CPU and, when available, CUDA (fp32 and fp16). Reports the median
milliseconds over ``--repeats`` timed runs per path, the speed-up and the max |difference|,
as JSON on stdout and in ``--out`` (written atomically). Targets (issue 7): >= 2x on CPU,
>= 3x on CUDA.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from sepsnet.fileio import atomic_write_bytes
from sepsnet.ops import roi_blend as rb


def make_inputs(n: int, k: int, h: int, w: int, m: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Boxes spread over a (4h x 4w) image with sizes 16..400 px, as detections would be."""
    g = torch.Generator().manual_seed(seed)
    bases = torch.randn(1, k, h, w, generator=g)
    attention = torch.randn(n, k, m, m, generator=g)
    img = torch.tensor([4.0 * w, 4.0 * h])
    xy = torch.rand(n, 2, generator=g) * img * 0.9
    wh = 16 + torch.rand(n, 2, generator=g) * 384
    rois = torch.cat([torch.zeros(n, 1), xy, torch.minimum(xy + wh, img)], 1)
    return bases.to(device, dtype), rois.to(device), attention.to(device, dtype)


def time_ms(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(device: str, dtype: torch.dtype, a: argparse.Namespace) -> dict:
    bases, rois, attention = make_inputs(a.instances, a.bases, a.height // 4, a.width // 4, a.attn_size,
                                         device, dtype)
    args = (a.mask_size, 0.25, a.sampling_ratio)
    with torch.inference_mode():
        fused = rb.roi_blend(bases, rois, attention, *args)
        unfused = rb.roi_blend_reference(bases, rois, attention, *args)
        t_f = time_ms(lambda: rb.roi_blend(bases, rois, attention, *args), a.repeats, device)
        t_u = time_ms(lambda: rb.roi_blend_reference(bases, rois, attention, *args), a.repeats, device)
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "fused_ms": round(t_f, 3),
            "unfused_ms": round(t_u, 3), "speedup": round(t_u / t_f, 2),
            "max_abs_diff": float((fused.float() - unfused.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--bases", type=int, default=4)
    p.add_argument("--height", type=int, default=1024, help="input image height (bases are 1/4)")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--attn-size", type=int, default=14)
    p.add_argument("--mask-size", type=int, default=56)
    p.add_argument("--sampling-ratio", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    rb.load()
    devices = ["cpu"] if a.device == "cpu" else []
    if a.device in ("auto", "cuda") and torch.cuda.is_available() and rb.is_available("cuda"):
        devices.append("cuda")
    elif a.device == "cuda":
        print("roi_blend_speed: no CUDA device or the op has no CUDA kernels", file=sys.stderr)
        return 2
    if a.device == "auto":
        devices.insert(0, "cpu")
    results = []
    for dev in devices:
        results.append(run_case(dev, torch.float32, a))
        if dev == "cuda":
            results.append(run_case(dev, torch.float16, a))
    report = {
        "benchmark": "roi_blend_speed", "instances": a.instances, "num_bases": a.bases,
        "bases_hw": [a.height // 4, a.width // 4], "attn_size": a.attn_size, "mask_size": a.mask_size,
        "sampling_ratio": a.sampling_ratio, "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None, "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        atomic_write_bytes(a.out, (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
