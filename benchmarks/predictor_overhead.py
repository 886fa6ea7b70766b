"""How much of a predictor frame is spent outside the dense engine (issue 13), ONNX Runtime on the CPU.

Real photos (default: the two sample COCO photos; ``--images DIR`` for your own) are resized to
``--size`` (default 512x1024, HxW) and given to ``PanopticPredictor`` as a camera loop would
(BGR uint8 arrays, ``predictor(frame, bgr=True)``); the decoding of the files is not part of the
frame. Every frame is timed per stage (``predictor.timing``; on the CPU this adds no device sync),
and the two engines' ``run`` calls are timed around the backend itself, so the same frames give,
side by side:

* ``dense``: the dense engine (``Backend.run``: ONNX Runtime plus its feed/fetch conversion);
* ``instance_engine``: the instance engine (ROIAlign + blend + confidence head): model compute,
  reported apart from the overhead;
* ``preprocess`` (resize + normalise + padding), ``postprocess`` (candidates, scoring, paste,
  dedup, stuff, fusion) and ``other`` (the rest of the frame: instance-engine feeds, result
  building, locks, stage bookkeeping).

Medians over ``--repeats`` passes over the frames (after ``--warmup`` passes). The shares are the
medians of the per-frame ratios: ``non_dense_share`` = (frame - dense) / frame (the issue's target:
<= 0.20, aim 0.10) and ``overhead_share`` = (frame - dense - instance engine) / frame. The machine
load (load average before and after, this process's CPU use) is saved alongside, since a loaded
machine inflates the threaded stages differently from the engines; so is the CPU time of the process
(all threads) per part, ``cpu_*`` and ``non_dense_cpu_share``, which a shared machine disturbs far less
than wall time (busy-waiting threads count in it: they are work the frame pays for).

``--profile-instance`` also runs the instance engine's graph, loaded as the predictor loads it (CPU
rewrites, threads), under ONNX Runtime's profiler on the feeds the predictor gave it for these frames,
and saves its kernel time per operator type and per node (``instance_engine_profile``) with the
convolutions' GFLOP per instance: where the instance engine's time goes.

``--compare-ort-defaults`` also builds the predictor with ONNX Runtime's own defaults (intra-op
threads that spin after a run, graphs loaded as exported: ``OrtBackend(spinning=True,
cpu_rewrites=False)``) and alternates passes with it, so both are measured under the same load.

    python benchmarks/predictor_overhead.py --bundle BUNDLE [--images DIR] [--size 512x1024]
        [--repeats 10] [--warmup 2] [--threads 2] [--compare-ort-defaults] [--profile-instance]
        [--out predictor_overhead.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
POST_STAGES = ("candidates", "scoring", "paste", "dedup", "stuff", "fusion")


class TimedBackend:
    """A backend whose ``run`` calls add their wall seconds to ``seconds`` (everything else is the
    wrapped backend's)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # CPU time of the whole process (every thread) during the calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def run(self, feeds: dict) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self._backend.run(feeds)
        finally:
            self.seconds += time.perf_counter() - t0
            self.cpu_seconds += time.process_time() - c0


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must be HxW (e.g. 512x1024), got {text!r}") from None
    if h < 8 or w < 8:
        raise SystemExit(f"--size {text}: both sides must be >= 8")
    return h, w


def load_frames(folder: Path, hw: tuple[int, int]) -> list[tuple[str, Any]]:
    """Every image of ``folder`` (sorted), resized to ``hw`` (area interpolation), as BGR uint8."""
    import cv2

    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    frames = []
    for p in files:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"{p}: cannot be decoded as an image")
        frames.append((p.name, cv2.resize(img, hw[::-1], interpolation=cv2.INTER_AREA)))
    if not frames:
        raise SystemExit(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return frames


def time_frame(predictor: Any, dense: TimedBackend, instance: TimedBackend, frame: Any) -> dict[str, float]:
    """One frame -> milliseconds per part (see the module docstring) and its instance count."""
    dense.seconds = instance.seconds = dense.cpu_seconds = instance.cpu_seconds = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    result = predictor(frame, bgr=True)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    st = result.timings
    post = sum(st.get(s, 0.0) for s in POST_STAGES)
    parts = {"frame": total, "dense": dense.seconds, "instance_engine": instance.seconds,
             "preprocess": st["preprocess"], "postprocess": post}
    parts["other"] = total - sum(v for k, v in parts.items() if k != "frame")
    out = {k: 1000.0 * v for k, v in parts.items()}
    out.update({f"stage_{s}": 1000.0 * st[s] for s in POST_STAGES if s in st})
    out.update({"cpu_frame": 1000.0 * cpu, "cpu_dense": 1000.0 * dense.cpu_seconds,
                "cpu_instance_engine": 1000.0 * instance.cpu_seconds,
                "cpu_rest": 1000.0 * (cpu - dense.cpu_seconds - instance.cpu_seconds)})
    out["non_dense_cpu_share"] = (cpu - dense.cpu_seconds) / cpu if cpu > 0 else float("nan")
    out["non_dense_share"] = (total - dense.seconds) / total
    out["overhead_share"] = (total - dense.seconds - instance.seconds) / total
    out["instances"] = float(len(result.instance_scores))
    out["thing_segments"] = float(sum(1 for s in result.segments_info if s["isthing"]))
    return out


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure(predictors: dict[str, Any], frames: list[tuple[str, Any]], repeats: int, warmup: int,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Alternate passes over ``frames`` between the ``predictors`` (so a change in machine load hits
    them alike); per predictor the medians over every frame run and per image."""
    timed = {}
    for key, predictor in predictors.items():
        timed[key] = (TimedBackend(predictor.dense), TimedBackend(predictor.instance))
        predictor.dense, predictor.instance = timed[key]
        predictor.timing = True
    for _ in range(warmup):
        for predictor in predictors.values():
            for _, frame in frames:
                predictor(frame, bgr=True)
    per_frame = {key: {name: [] for name, _ in frames} for key in predictors}
    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for r in range(repeats):
        line = []
        for key, predictor in predictors.items():
            for name, frame in frames:
                per_frame[key][name].append(time_frame(predictor, *timed[key], frame))
            last = [runs[-1] for runs in per_frame[key].values()]
            line.append(f"{key}: frame {statistics.median(x['frame'] for x in last):.1f} ms, dense "
                        f"{statistics.median(x['dense'] for x in last):.1f} ms")
        progress(f"pass {r + 1}/{repeats}: " + "; ".join(line))
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    load_after = os.getloadavg()
    for key, predictor in predictors.items():
        predictor.dense, predictor.instance = (t._backend for t in timed[key])
    out: dict[str, Any] = {}
    for key in predictors:
        every = [run for runs in per_frame[key].values() for run in runs]
        out[key] = {"median": median_of(every),
                    "per_image": {name: median_of(runs) for name, runs in per_frame[key].items()}}
    out["machine"] = {"load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(load_after),
                      "cpu_count": os.cpu_count(),
                      "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                      "process_cpu_s": cpu, "wall_s": wall, "process_cpu_per_wall": cpu / wall}
    return out


def summary(med: dict[str, float]) -> dict[str, Any]:
    return {"median_ms": {k: v for k, v in med.items() if not k.endswith("share")
                          and k not in ("instances", "thing_segments")},
            "instances_per_frame": med["instances"], "thing_segments_per_frame": med["thing_segments"],
            "non_dense_share": med["non_dense_share"], "overhead_share": med["overhead_share"],
            "non_dense_cpu_share": med["non_dense_cpu_share"]}


def instance_feeds(predictor: Any, frames: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """The instance engine's feeds (NumPy) for each frame, as the predictor gives them."""
    engine, seen = predictor.instance, []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def run(self, feeds: dict) -> dict:
            seen.append({k: v.detach().cpu().numpy().copy() for k, v in feeds.items()})
            return engine.run(feeds)

    predictor.instance = Recording()
    try:
        for _, frame in frames:
            predictor(frame, bgr=True)
    finally:
        predictor.instance = engine
    return seen


def conv_gflop_per_row(model_bytes_or_path: Any) -> float:
    """GFLOP of the graph's Conv nodes per instance row (2 x MACs; static weights and spatial sizes)."""
    import onnx

    model = (onnx.load_from_string(model_bytes_or_path) if isinstance(model_bytes_or_path, bytes)
             else onnx.load(str(model_bytes_or_path)))
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    flop = 0.0
    for node in model.graph.node:
        out = shapes.get(node.output[0], [])
        if node.op_type == "Conv" and node.input[1] in weights and len(out) == 4 and all(out[1:]):
            k = weights[node.input[1]]  # (out channels, in channels per group, kh, kw)
            flop += 2.0 * out[1] * k[1] * k[2] * k[3] * out[2] * out[3]
    return flop / 1e9


def profile_instance_engine(predictor: Any, frames: list[tuple[str, Any]], threads: int, runs: int = 3
                            ) -> dict[str, Any]:
    """Kernel milliseconds per instance-engine call, by operator type and by node (ONNX Runtime's
    profiler), on the graph the predictor's CPU backend loads."""
    import json

    import onnxruntime as ort

    from sepsnet.engines.ort_graph import cpu_graph

    engine = predictor.instance
    path = engine.path
    source = (cpu_graph(path)[0] if engine.rewrites else None) or str(path)
    feeds = instance_feeds(predictor, frames)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"sepsnet_instance_{os.getpid()}")
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        for f in feeds:
            session.run(None, f)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    calls = max(1, sum(1 for e in events if e.get("name") == "model_run"))
    by_op: dict[str, float] = {}
    by_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000.0 / calls
            node = by_node.setdefault(e["name"][:-len("_kernel_time")], [op, 0.0])
            node[1] += e["dur"] / 1000.0 / calls
    total = sum(by_op.values())
    top = sorted(by_node.items(), key=lambda kv: -kv[1][1])[:12]
    return {"calls": calls, "rows_per_call": statistics.median(len(f["rois"]) for f in feeds),
            "kernel_ms_per_call": total,
            "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "top_nodes_ms": [{"node": k, "op": v[0], "ms": v[1]} for k, v in top],
            "conv_gflop_per_row": conv_gflop_per_row(source if isinstance(source, bytes) else path)}


def ort_defaults_predictor(bundle: str, threads: int) -> Any:
    """The same bundle with ONNX Runtime's own defaults: spinning intra-op threads, graphs as exported."""
    from sepsnet.engines.ort_backend import OrtBackend
    from sepsnet.engines.predictor import PanopticPredictor

    predictor = PanopticPredictor.from_bundle(bundle, backend="ort", device="cpu", threads=threads)
    for role in ("dense", "instance"):
        backend = getattr(predictor, role)
        setattr(predictor, role, OrtBackend(backend.path, device="cpu", threads=threads, spinning=True,
                                            cpu_rewrites=False))
    return predictor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="export bundle (sepsnet-export --onnx-only)")
    p.add_argument("--images", default=str(ROOT / "samples" / "coco_panoptic_sample" / "images"),
                   help="folder of images (default: the sample COCO photos)")
    p.add_argument("--size", default="512x1024", help="frame size HxW the images are resized to")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads and torch threads")
    p.add_argument("--postprocess-threads", type=int, default=None,
                   help="torch threads for the post-processing (predictor.postprocess_threads; default: --threads)")
    p.add_argument("--compare-ort-defaults", action="store_true",
                   help="also time the bundle with ONNX Runtime's defaults (spinning threads, graphs as exported), "
                        "alternating passes with the predictor's settings")
    p.add_argument("--panoptic-only", action="store_true",
                   help="predictor.panoptic_only: the instance engine only on candidates that can enter the "
                        "panoptic result (same panoptic output)")
    p.add_argument("--profile-instance", action="store_true",
                   help="also profile the instance engine per operator (ONNX Runtime's profiler) on these frames")
    p.add_argument("--out", default="predictor_overhead.json")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.warmup < 0 or a.threads < 1 or (a.postprocess_threads or 1) < 1:
        raise SystemExit("--repeats, --threads and --postprocess-threads must be >= 1, --warmup >= 0")
    hw = parse_hw(a.size)
    frames = load_frames(Path(a.images), hw)
    import onnxruntime
    import torch

    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.fileio import atomic_write_json

    torch.set_num_threads(a.threads)
    predictor = PanopticPredictor.from_bundle(a.bundle, backend="ort", device="cpu", threads=a.threads)
    predictors = {"predictor": predictor}
    if a.compare_ort_defaults:
        predictors["ort_defaults"] = ort_defaults_predictor(a.bundle, a.threads)
    for each in predictors.values():
        each.postprocess_threads = a.postprocess_threads
        each.panoptic_only = a.panoptic_only
    got = measure(predictors, frames, a.repeats, a.warmup)
    med = got["predictor"]["median"]
    result = {
        "bundle": str(a.bundle), "input_hw": predictor.input_hw, "backend": predictor.backend_choice,
        "images": [name for name, _ in frames], "frame_hw": list(hw),
        "network_input_resized_hw": list(predictor.preprocess(frames[0][1])[1][0]),
        "threads": a.threads, "postprocess_threads": a.postprocess_threads or a.threads,
        "panoptic_only": a.panoptic_only, "repeats": a.repeats,
        "warmup": a.warmup,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, **summary(med),
        "targets": {"non_dense_share <= 0.20": med["non_dense_share"] <= 0.20,
                    "non_dense_share <= 0.10 (aim)": med["non_dense_share"] <= 0.10},
        "machine": got["machine"], "per_image": got["predictor"]["per_image"],
    }
    if a.compare_ort_defaults:
        result["ort_defaults"] = {**summary(got["ort_defaults"]["median"]),
                                  "per_image": got["ort_defaults"]["per_image"]}
    if a.profile_instance:
        result["instance_engine_profile"] = profile_instance_engine(predictor, frames, a.threads)
    atomic_write_json(result, a.out)
    print(f"predictor overhead, {predictor.backend_choice}, {a.threads} threads (post-processing "
          f"{a.postprocess_threads or a.threads}), {len(frames)} image(s) at "
          f"{hw[0]}x{hw[1]}, {med['instances']:.0f} instances/frame")
    for k in ("frame", "dense", "instance_engine", "preprocess", "postprocess", "other"):
        print(f"  {k:16s} {med[k]:8.1f} ms")
    for s in POST_STAGES:
        if f"stage_{s}" in med:
            print(f"    {s:14s} {med[f'stage_{s}']:8.1f} ms")
    m = got["machine"]
    print(f"  non-dense share {med['non_dense_share']:.1%} (target <= 20%, aim 10%); without the instance engine "
          f"{med['overhead_share']:.1%}")
    print(f"  CPU time (all threads) per frame {med['cpu_frame']:.1f} ms: dense {med['cpu_dense']:.1f}, "
          f"instance engine {med['cpu_instance_engine']:.1f}, the rest {med['cpu_rest']:.1f}; non-dense CPU share "
          f"{med['non_dense_cpu_share']:.1%}")
    print(f"  load average {m['load_average_1_5_15_before'][0]:.2f} -> {m['load_average_1_5_15_after'][0]:.2f} "
          f"on {m['cpu_count']} CPUs; this process used {m['process_cpu_per_wall']:.2f} CPUs")
    if a.compare_ort_defaults:
        od = got["ort_defaults"]["median"]
        print(f"  same run, ONNX Runtime defaults (spinning threads, graphs as exported): frame {od['frame']:.1f} ms, "
              f"dense {od['dense']:.1f}, instance engine {od['instance_engine']:.1f}, post-processing "
              f"{od['postprocess']:.1f} ms; non-dense share {od['non_dense_share']:.1%} (CPU "
              f"{od['non_dense_cpu_share']:.1%})")
    if a.profile_instance:
        prof = result["instance_engine_profile"]
        ops = ", ".join(f"{op} {ms:.1f}" for op, ms in list(prof["by_op_ms"].items())[:6])
        print(f"  instance engine profile ({prof['rows_per_call']:.0f} rows/call, convolutions "
              f"{prof['conv_gflop_per_row']:.3f} GFLOP/row): kernels {prof['kernel_ms_per_call']:.1f} ms/call: {ops}")
    print(f"  saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
