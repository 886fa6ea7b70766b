"""Pipelined streaming loop vs calling the predictor frame by frame, on a video of real photos.

The video: the sample COCO photos resized to 512x1024 (HxW), panning a few pixels per frame,
MJPG in an AVI (decoding is part of the loop, as with a camera). Both loops read the same file
and process every frame:

* ``frame_by_frame``: ``cv2.VideoCapture.read`` then ``predictor(frame, bgr=True)``, in turn;
* ``pipelined``: ``FrameStream`` (capture, preprocessing, dense engine and post-processing on
  their own threads, bounded queues).

Runs alternate (``--repeats``), so a change in machine load hits both alike; medians are reported.
Throughput excludes the first ``--warmup`` frames. Targets (issue 14): pipelined FPS >= 1.3x
frame-by-frame, and pipelined frame age p99 <= 2x p50. Pinned to ``--cores`` CPUs (default 2).

    python benchmarks/stream_speed.py --bundle BUNDLE [--frames 40] [--repeats 3] [--out stream_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_video(path: Path, n: int, hw: tuple[int, int] = (512, 1024), fps: float = 30.0) -> Path:
    import cv2
    import numpy as np

    photos = sorted((ROOT / "samples" / "coco_panoptic_sample" / "images").glob("*.jpg"))
    frames = [cv2.resize(cv2.imread(str(p)), hw[::-1], interpolation=cv2.INTER_AREA) for p in photos]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, hw[::-1])
    for i in range(n):
        writer.write(np.ascontiguousarray(np.roll(frames[(i // 10) % len(frames)], 4 * i, axis=1)))
    writer.release()
    return path


def frame_by_frame(predictor, video: Path, warmup: int) -> dict:
    import cv2

    cap = cv2.VideoCapture(str(video))
    stamps, ages = [], []
    while True:
        t0 = time.perf_counter()
        ok, frame = cap.read()
        if not ok:
            break
        predictor(frame, bgr=True)
        stamps.append(time.perf_counter())
        ages.append((stamps[-1] - t0) * 1000)
    cap.release()
    t = stamps[warmup:]
    return {"frames": len(stamps), "fps": (len(t) - 1) / (t[-1] - t[0]),
            "age_p50_ms": statistics.median(ages[warmup:]), "age_p99_ms": _p99(ages[warmup:])}


def pipelined(predictor, video: Path, warmup: int) -> dict:
    from sepsnet.engines.stream import FrameStream

    stream = FrameStream(predictor, video, keep_frames=False)
    stats = stream.run()
    summary = stats.summary(warmup)
    return {"frames": stats.processed, "fps": summary["fps"], "age_p50_ms": summary["age_ms"]["p50"],
            "age_p99_ms": summary["age_ms"]["p99"], "dropped": stats.dropped,
            "stages_ms": summary["stages_ms"]}


def _p99(values: list[float]) -> float:
    import numpy as np

    return float(np.percentile(values, 99))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="export bundle of the trained tiny model")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--out", default="stream_speed.json")
    a = p.parse_args()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:a.cores]
        os.sched_setaffinity(0, cpus)
    import torch

    from sepsnet.engines.predictor import PanopticPredictor

    torch.set_num_threads(a.cores)
    predictor = PanopticPredictor.from_bundle(a.bundle, backend="ort", device="cpu", threads=a.cores)
    runs: dict[str, list[dict]] = {"frame_by_frame": [], "pipelined": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = make_video(Path(tmp) / "drive.avi", a.frames)
        for _ in range(a.repeats):
            runs["frame_by_frame"].append(frame_by_frame(predictor, video, a.warmup))
            runs["pipelined"].append(pipelined(predictor, video, a.warmup))
            print(f"frame-by-frame {runs['frame_by_frame'][-1]['fps']:.2f} FPS, pipelined "
                  f"{runs['pipelined'][-1]['fps']:.2f} FPS", flush=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    fbf, pip = med("frame_by_frame", "fps"), med("pipelined", "fps")
    p50, p99 = med("pipelined", "age_p50_ms"), med("pipelined", "age_p99_ms")
    result = {
        "video": {"frames": a.frames, "height": 512, "width": 1024, "codec": "MJPG"},
        "bundle": str(a.bundle), "input_hw": predictor.input_hw, "backend": predictor.backend_choice,
        "cores": a.cores, "cpu": platform.processor() or platform.machine(), "warmup": a.warmup,
        "frame_by_frame_fps": fbf, "pipelined_fps": pip, "speedup": pip / fbf,
        "frame_by_frame_latency_p50_ms": med("frame_by_frame", "age_p50_ms"),
        "pipelined_age_p50_ms": p50, "pipelined_age_p99_ms": p99, "age_p99_over_p50": p99 / p50,
        "targets": {"speedup >= 1.3": pip / fbf >= 1.3, "age p99 <= 2 x p50": p99 <= 2 * p50},
        "runs": runs,
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
