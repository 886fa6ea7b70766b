"""``sepsnet-bench PATH [--iters N] [--warmup N] [--json OUT] [--size HxW] [--backend B]``
``sepsnet-bench PATH (--video FILE | --images DIR) [--deadline-ms N] [--realtime] [--frames N]``.

PATH: a bundle folder, its manifest.json, a ``.plan`` (manifest found beside it), a single
``.onnx`` graph (timed alone with ONNX Runtime on random inputs: batch 1, its static dims as
declared, dynamic height/width from ``--size``, else from the manifest beside it, else 512x1024)
or a training checkpoint (``.pt``/``.pth``/``.ckpt``, eager PyTorch). Prints p50/p90/p99/mean
latency, FPS and the per-stage breakdown; ``--json`` saves the same figures.

With ``--video``/``--images`` the model runs the streaming runtime (``sepsnet.engines.stream``) on
real frames as a camera loop would: steady-state FPS (after ``--warmup`` frames), frame age
p50/p90/p99, deadline-miss rate, drops and per-stage p50/p99. ``--realtime`` reads the video at its
frame rate with latest-frame dropping, like a live camera; otherwise every frame is processed.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sepsnet.cli._common import nonnegative_int, positive_int, preflight, run_cli
from sepsnet.errors import SEPSNetError
from sepsnet.postprocess.timing import FRAME_STAGES

STAGES = FRAME_STAGES  # one name per stage, as the pipeline and the predictor record them
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
DEFAULT_ONNX_HW = (512, 1024)
ONNX_INSTANCES = 8  # instance count fed to a dynamic instance graph


class BenchUsageError(SEPSNetError, ValueError):
    """A sepsnet-bench argument is malformed or does not fit the thing benchmarked."""


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` -> (H, W), both positive; BenchUsageError with the expected form otherwise."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 1:
        raise BenchUsageError(f"--size {text!r}: expected HEIGHTxWIDTH with two positive integers, e.g. 512x1024")
    return int(parts[0]), int(parts[1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summarize(totals: list[float], stages: dict[str, list[float]]) -> dict[str, Any]:
    ms = [t * 1000 for t in totals]
    out = {"p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
           "mean_ms": statistics.fmean(ms), "fps": 1000.0 / statistics.fmean(ms), "iters": len(ms)}
    out["stages_ms"] = {k: statistics.fmean(v) * 1000 for k, v in stages.items() if v}
    out["stages_p50_p99_ms"] = {k: {"p50": percentile(v, 50) * 1000, "p99": percentile(v, 99) * 1000}
                                for k, v in stages.items() if v}
    return out


def environment(backend: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    from sepsnet.engines.trt_backend import tensorrt_version

    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return {"backend": backend, "device": device, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "tensorrt": tensorrt_version(), "python": platform.python_version()}


def bench_loop(fn: Callable[[], dict[str, float]], iters: int,
               warmup: int) -> tuple[list[float], dict[str, list[float]]]:
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


def _random_frame(size: str | None, default: tuple[int, int]) -> np.ndarray:
    h, w = parse_size(size) if size else default
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _manifest_hw(path: Path) -> tuple[int, int] | None:
    """Input size recorded in the manifest beside an ONNX graph, or None."""
    from sepsnet.export.bundle import MANIFEST, load_manifest

    if not (path.parent / MANIFEST).is_file():
        return None
    try:
        inp = load_manifest(path.parent)["input"]
        return int(inp["height"]), int(inp["width"])
    except (SEPSNetError, KeyError, TypeError, ValueError):
        return None


# input pixels per element of each spatial input of our graphs (dense: image; instance: bases, P3)
_STRIDES = {"image": 1, "bases": 4, "p3": 8}


def _static_hw(specs: Sequence[Any]) -> tuple[int, int] | None:
    """Input size implied by a static spatial input of the graph, or None when all are dynamic."""
    for spec in specs:
        stride = _STRIDES.get(spec.name)
        if stride and len(spec.shape) == 4 and all(isinstance(d, int) and d > 0 for d in spec.shape[2:]):
            return int(spec.shape[2]) * stride, int(spec.shape[3]) * stride
    return None


def onnx_feed_shapes(specs: Sequence[Any], size: str | None, manifest_hw: tuple[int, int] | None
                     ) -> tuple[dict[str, list[int]], tuple[int, int]]:
    """Shapes to feed each graph input, and the image size (H, W) they stand for.

    Batch 1; static dims as declared; dynamic H/W of ``image`` (and of ``bases``/``p3`` at 1/4 and
    1/8) from ``--size``, else the graph's static size, else the manifest's, else 512x1024;
    ``ONNX_INSTANCES`` rois/attention vectors on a dynamic instance dim."""
    static = _static_hw(specs)
    if size:
        hw = parse_size(size)
        if static is not None and static != hw:
            raise BenchUsageError(f"--size {size}: the graph has a static input size {static[0]}x{static[1]}; "
                                  "omit --size or export with --dynamic")
    else:
        hw = static or manifest_hw or DEFAULT_ONNX_HW
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        stride = _STRIDES.get(spec.name, 1)
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int) and d > 0:
                shape.append(int(d))
            elif spec.name in ("rois", "attention") and axis == 0:
                shape.append(ONNX_INSTANCES)
            elif axis == 0:
                shape.append(1)  # batch
            elif len(spec.shape) == 4 and axis in (2, 3):
                shape.append(max(1, -(-hw[axis - 2] // stride)))
            else:
                raise BenchUsageError(f"input {spec.name!r} has a dynamic dim {d!r} (axis {axis}) that "
                                      "sepsnet-bench cannot size; benchmark the bundle instead")
        shapes[spec.name] = shape
    return shapes, hw


def _bench_onnx(path: Path, iters: int, warmup: int, size: str | None = None,
                threads: int | None = None) -> tuple[list[float], dict[str, list[float]], str, dict[str, list[int]]]:
    import torch

    from sepsnet.engines.ort_backend import OrtBackend

    backend = OrtBackend(path, threads=threads)
    shapes, (h, w) = onnx_feed_shapes(backend.inputs, size, None if size else _manifest_hw(path))
    gen = torch.Generator().manual_seed(0)
    feeds = {}
    for spec in backend.inputs:
        shape = shapes[spec.name]
        if spec.name == "rois":  # [batch 0, x1, y1, x2, y2] boxes inside the image, in input pixels
            n = shape[0]
            xy = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
            wh = (torch.rand(n, 2, generator=gen) * 0.3 + 0.05) * torch.tensor([float(w), float(h)])
            feeds[spec.name] = torch.cat([torch.zeros(n, 1), xy, xy + wh], dim=1)
        elif "int" in spec.dtype:
            feeds[spec.name] = torch.zeros(shape, dtype=torch.int64)
        else:
            feeds[spec.name] = torch.rand(*shape, generator=gen)
    totals, stages = bench_loop(lambda: (backend.run(feeds), {})[1], iters, warmup)
    return totals, stages, backend.name, shapes


def _load_predictor(a: argparse.Namespace, path: Path) -> Any:
    from sepsnet.engines.predictor import PanopticPredictor

    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return PanopticPredictor.from_checkpoint(path, device=a.device)
    if path.is_file() and path.suffix not in (".plan",) and path.name != "manifest.json":
        raise BenchUsageError(f"cannot stream through {path}: expected a bundle folder, its manifest.json, a .plan "
                              f"or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
    backend_name = "trt" if path.suffix == ".plan" and a.backend == "auto" else a.backend
    return PanopticPredictor.from_bundle(path if path.is_dir() else path.parent, backend=backend_name,
                                         threads=a.threads, cuda_graph=a.cuda_graph, device=a.device)


def _bench_stream(a: argparse.Namespace, path: Path) -> int:
    """The streaming runtime on real frames: what a camera loop gets (see the module docstring)."""
    from sepsnet.engines.sources import open_source
    from sepsnet.engines.stream import FrameStream

    spec = a.video or a.images
    if a.video and not Path(a.video).is_file():
        raise BenchUsageError(f"--video {a.video}: no such file")
    if a.images and not (Path(a.images).is_dir() or any(c in a.images for c in "*?[")):
        raise BenchUsageError(f"--images {a.images}: not a folder or glob")
    source = open_source(spec, pace=a.realtime)
    predictor = _load_predictor(a, path)
    predictor.timing = True  # per-stage p50/p99 (on CUDA: a sync at each stage end)
    stream = FrameStream(predictor, source, deadline_ms=a.deadline_ms, keep_frames=False, max_frames=a.frames,
                         drop=True if a.realtime else None)
    t0 = time.perf_counter()
    stats = stream.run()
    seconds = time.perf_counter() - t0
    warmup = min(a.warmup, max(0, stats.processed - 2))
    summary = stats.summary(warmup)
    result = {"path": str(path), "mode": "stream", "source": spec, "realtime": a.realtime,
              "deadline_ms": a.deadline_ms, "seconds": seconds, "end_reason": stream.end_reason,
              "backend_choice": predictor.backend_choice, **summary, **environment(predictor.dense.name)}
    age = summary["age_ms"]
    print(f"sepsnet-bench {path} on {spec} ({predictor.backend_choice}, {result['device']})")
    print(f"  {summary['processed']} frames ({summary['frames_read']} read, {summary['dropped']} dropped, "
          f"{summary['bad']} bad) in {seconds:.1f} s; steady-state FPS {summary['fps']:.2f} (after {warmup} warm-up)")
    print(f"  frame age ms  p50 {age['p50']:.1f}  p90 {age['p90']:.1f}  p99 {age['p99']:.1f}   deadline "
          f"{a.deadline_ms if a.deadline_ms else '-'} ms: {summary['late']} late ({summary['miss_rate']:.1%})")
    for stage, q in summary["stages_ms"].items():
        print(f"  {stage:12s} p50 {q['p50']:8.2f} ms   p99 {q['p99']:8.2f} ms")
    _save(result, a.json_out)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-bench", description=__doc__)
    p.add_argument("path")
    p.add_argument("--iters", type=positive_int, default=50)
    p.add_argument("--warmup", type=nonnegative_int, default=5)
    p.add_argument("--json", dest="json_out", help="save the figures as JSON here")
    p.add_argument("--size", help="frame size HxW (default: the bundle's input size; for an .onnx graph its "
                                  "static size, else the manifest beside it, else 512x1024)")
    p.add_argument("--backend", default="auto", help="auto | ort | trt (bundles)")
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--cuda-graph", action="store_true",
                   help="TensorRT: replay the static dense engine from a captured CUDA graph")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--video", help="run the streaming loop on this video file (real frames)")
    frames.add_argument("--images", help="run the streaming loop on this folder (or glob) of images")
    p.add_argument("--deadline-ms", type=float, default=None, help="per-frame budget, capture to result (streams)")
    p.add_argument("--realtime", action="store_true", help="--video: read at its frame rate, dropping stale frames")
    p.add_argument("--frames", type=int, default=None, help="streams: stop after this many frames")
    a = p.parse_args(argv)
    preflight(out_files={"--json": a.json_out}, inputs={"PATH": a.path})  # before anything is loaded or timed
    from sepsnet.engines.predictor import PanopticPredictor

    path = Path(a.path)
    if not path.exists():
        raise SEPSNetError(f"nothing to benchmark at {path}")
    if a.size:
        parse_size(a.size)  # a malformed --size fails before anything is loaded
    if a.deadline_ms is not None and not a.deadline_ms > 0:
        raise BenchUsageError(f"--deadline-ms must be > 0, got {a.deadline_ms}")
    if a.frames is not None and a.frames < 2:
        raise BenchUsageError(f"--frames must be >= 2, got {a.frames}")
    if a.video or a.images:
        return _bench_stream(a, path)
    extra: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".onnx":
        totals, stages, backend, shapes = _bench_onnx(path, a.iters, a.warmup, a.size, a.threads)
        kind, extra = "onnx graph", {"input_shapes": shapes}
    else:
        if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES + (".plan",) and path.name != "manifest.json":
            raise BenchUsageError(f"cannot benchmark {path}: expected a bundle folder, its manifest.json, a .plan, "
                                  f"an .onnx graph or a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            predictor = PanopticPredictor.from_checkpoint(path, device=a.device)
            kind, default = "checkpoint", (predictor.data.min_size_test, predictor.data.max_size_test)
        else:  # bundle folder, manifest.json or a .plan inside a bundle
            # a plan means TensorRT
            backend_name = "trt" if path.suffix == ".plan" and a.backend == "auto" else a.backend
            predictor = PanopticPredictor.from_bundle(path if path.is_dir() else path.parent, backend=backend_name,
                                                      threads=a.threads, cuda_graph=a.cuda_graph, device=a.device)
            kind = "bundle"
            default = predictor.input_hw or (predictor.data.min_size_test, predictor.data.max_size_test)
        frame = _random_frame(a.size, default)
        predictor.timing = True  # per-stage figures (on CUDA: a sync at each stage end)
        totals, stages = bench_loop(lambda: predictor(frame).timings, a.iters, a.warmup)
        backend = predictor.dense.name
    result = {"path": str(path), "kind": kind, **summarize(totals, stages), **environment(backend), **extra}
    print(f"sepsnet-bench {path} ({kind}, {backend}, {result['device']})")
    for name, shape in extra.get("input_shapes", {}).items():
        print(f"  input {name:10s} {'x'.join(map(str, shape))}")
    print(f"  latency ms  p50 {result['p50_ms']:.2f}  p90 {result['p90_ms']:.2f}  p99 {result['p99_ms']:.2f}  "
          f"mean {result['mean_ms']:.2f}   FPS {result['fps']:.1f}   ({a.iters} iters, {a.warmup} warm-up)")
    for stage, ms in result["stages_ms"].items():
        print(f"  {stage:12s} {ms:8.2f} ms")
    _save(result, a.json_out)
    return 0


def _save(result: dict[str, Any], path: str | None) -> None:
    """The figures as JSON, written atomically, when ``--json`` names a file."""
    if path:
        from sepsnet.fileio import atomic_write_json

        atomic_write_json(result, path)
        print(f"  saved {path}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
