"""``sepsnet-bench PATH [--iters N] [--warmup N] [--json OUT] [--size HxW] [--backend B]``.

PATH: a bundle folder, its manifest.json, a ``.plan`` (manifest found beside it), a single
``.onnx`` graph (timed alone with ONNX Runtime on random inputs of its declared shapes) or a
training checkpoint (eager PyTorch). Prints p50/p90/p99/mean latency, FPS and the per-stage
breakdown; ``--json`` saves the same figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from sepsnet.cli._common import run_cli
from sepsnet.errors import SEPSNetError

STAGES = ("preprocess", "dense", "nms", "instance", "postprocess")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(totals: list[float], stages: dict[str, list[float]]) -> dict[str, Any]:
    ms = [t * 1000 for t in totals]
    out = {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
           "mean_ms": statistics.fmean(ms), "fps": 1000.0 / statistics.fmean(ms), "iters": len(ms)}
    out["stages_ms"] = {k: statistics.fmean(v) * 1000 for k, v in stages.items() if v}
    return out


def environment(backend: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    from sepsnet.engines.trt_backend import tensorrt_version

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"backend": backend, "device": device, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": tensorrt_version(), "python": platform.python_version()}


def bench_loop(fn: Callable[[], dict[str, float]], iters: int, warmup: int) -> tuple[list[float], dict[str, list[float]]]:
    for _ in range(warmup):
        fn()
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(iters):
        t0 = time.perf_counter()
        timings = fn()
        totals.append(time.perf_counter() - t0)
        for s in STAGES:
            if s in timings:
                stages[s].append(timings[s])
    return totals, stages


def _random_frame(size: Optional[str], default: tuple[int, int]) -> np.ndarray:
    h, w = (int(v) for v in size.lower().split("x")) if size else default
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _bench_onnx(path: Path, iters: int, warmup: int) -> tuple[list[float], dict[str, list[float]], str]:
    from sepsnet.engines.ort_backend import OrtBackend
    import torch

    backend = OrtBackend(path)
    feeds = {}
    for spec in backend.inputs:
        shape = [d if isinstance(d, int) and d > 0 else 8 for d in spec.shape]
        if spec.name == "rois":
            shape = [8, 5]
        feeds[spec.name] = torch.rand(*shape) * (0 if spec.name == "rois" else 1)
        if spec.name == "rois":
            feeds[spec.name][:, 1:] = torch.tensor([4.0, 4.0, 60.0, 60.0])
    totals, stages = bench_loop(lambda: (backend.run(feeds), {})[1], iters, warmup)
    return totals, stages, backend.name


def _main(argv: Optional[Sequence[str]]) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-bench", description=__doc__)
    p.add_argument("path")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", dest="json_out", help="save the figures as JSON here")
    p.add_argument("--size", help="frame size HxW (default: the bundle's input size)")
    p.add_argument("--backend", default="auto", help="auto | ort | trt (bundles)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--cuda-graph", action="store_true",
                   help="TensorRT: replay the static dense engine from a captured CUDA graph")
    a = p.parse_args(argv)
    from sepsnet.engines.predictor import PanopticPredictor

    path = Path(a.path)
    if not path.exists():
        raise SEPSNetError(f"nothing to benchmark at {path}")
    if path.suffix == ".onnx":
        totals, stages, backend = _bench_onnx(path, a.iters, a.warmup)
        kind = "onnx graph"
    else:
        if path.suffix in (".pt", ".pth"):
            predictor = PanopticPredictor.from_checkpoint(path)
            kind, default = "checkpoint", (predictor.data.min_size_test, predictor.data.max_size_test)
        else:  # bundle folder, manifest.json or a .plan inside a bundle
            backend_name = "trt" if path.suffix == ".plan" and a.backend == "auto" else a.backend  # a plan means TensorRT
            predictor = PanopticPredictor.from_bundle(path if path.is_dir() else path.parent, backend=backend_name,
                                                      threads=a.threads, cuda_graph=a.cuda_graph)
            kind = "bundle"
            default = predictor.input_hw or (predictor.data.min_size_test, predictor.data.max_size_test)
        frame = _random_frame(a.size, default)
        totals, stages = bench_loop(lambda: predictor(frame).timings, a.iters, a.warmup)
        backend = predictor.dense.name
    result = {"path": str(path), "kind": kind, **summarize(totals, stages), **environment(backend)}
    print(f"sepsnet-bench {path} ({kind}, {backend}, {result['device']})")
    print(f"  latency ms  p50 {result['p50_ms']:.2f}  p90 {result['p90_ms']:.2f}  p99 {result['p99_ms']:.2f}  "
          f"mean {result['mean_ms']:.2f}   FPS {result['fps']:.1f}   ({a.iters} iters, {a.warmup} warm-up)")
    for stage, ms in result["stages_ms"].items():
        print(f"  {stage:12s} {ms:8.2f} ms")
    if a.json_out:
        from sepsnet.fileio import atomic_write_bytes

        atomic_write_bytes(a.json_out, json.dumps(result, indent=2).encode())
        print(f"  saved {a.json_out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
