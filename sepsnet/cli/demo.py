"""``sepsnet-demo (--bundle DIR | --checkpoint C [--config X]) INPUTS... --out DIR``

INPUTS: images, folders or globs of images (panoptic PNG + COCO JSON + an overlay PNG each),
video files, camera indices (``0``), URLs or GStreamer pipelines (``... ! appsink``): each stream
gives ``<name>_overlay.mp4`` (or ``.avi``), ``<name>.jsonl`` (one line per frame: segments,
timings, frame age, deadline flag) and ``<name>_summary.json``. Inputs with equal stems get
distinct output names (``a_frame``, ``b_frame``). Ctrl-C stops cleanly: the video stays playable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sepsnet.cli._common import preflight, run_cli
from sepsnet.errors import DataError

VIDEO_CODECS = {".mp4": "mp4v", ".avi": "MJPG"}


def _expand(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """(spec, kind) per input, folders and globs expanded to their images; DataError for what
    names nothing, before any model is loaded."""
    from sepsnet.engines.sources import classify, image_files

    out: list[tuple[str, str]] = []
    for spec in inputs:
        kind = classify(spec)
        if kind == "missing":
            raise DataError(f"input {spec!r}: no such file or folder (nor a camera index, URL or pipeline)")
        if kind == "images":
            files = image_files(spec) or []
            if not files:
                raise DataError(f"input {spec!r}: no images there")
            out.extend((str(f), "image") for f in files)
        else:
            out.append((spec, kind))
    return out


def _segments(result: Any, classes: dict[str, Any]) -> list[dict[str, Any]]:
    segs = []
    for s in result.segments_info:
        cat = (classes["things"] if s["isthing"] else classes["stuff"])[s["category_id"]]
        seg = {"id": int(s["id"]), "category_id": int(s["category_id"]), "category": cat["name"],
               "isthing": bool(s["isthing"]), "score": None if s.get("score") is None else round(float(s["score"]), 4),
               "area": int(s["area"]), "bbox": [int(v) for v in s["bbox"]]}
        if "track_id" in s:
            seg["track_id"] = int(s["track_id"])
        segs.append(seg)
    return segs


def _can_show() -> bool:
    """A window can open: a display exists and OpenCV has GUI support (pip's headless build has none)."""
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("--show: no display here (DISPLAY is not set); not showing", file=sys.stderr)
        return False
    try:
        cv2.namedWindow("sepsnet-demo", cv2.WINDOW_NORMAL)
    except cv2.error:
        print("--show: this OpenCV has no window support (opencv-python-headless); not showing", file=sys.stderr)
        return False
    return True


class OverlayVideo:
    """Overlay frames into ``path`` (MP4 or AVI by suffix). Written under a hidden partial name and
    renamed on :meth:`close`, so the final name only ever holds a finished, playable file."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, fps
        self.partial = path.with_name(f".{path.stem}.partial{path.suffix}")
        self.writer: Any = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, rgb: Any) -> None:
        import cv2

        if self.writer is None:
            h, w = rgb.shape[:2]
            self.size = (w, h)
            self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*VIDEO_CODECS[self.path.suffix]),
                                          self.fps, self.size)
            if not self.writer.isOpened():
                raise DataError(f"cannot write video {self.path} (no {VIDEO_CODECS[self.path.suffix]} encoder in "
                                "this OpenCV?); try --video-format avi")
        bgr = rgb[..., ::-1]
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(bgr.copy())
        self.frames += 1

    def close(self) -> Path | None:
        if self.writer is None:
            return None
        self.writer.release()  # writes the index (MP4 moov atom / AVI idx1): playable from here
        os.replace(self.partial, self.path)
        return self.path


def _run_stream(predictor: Any, spec: str, name: str, out: Path, a: argparse.Namespace) -> None:
    """One video/camera/stream through the pipelined runtime; KeyboardInterrupt again after the
    outputs are finished when the user stopped it."""
    import cv2
    from tqdm import tqdm

    from sepsnet.engines.sources import open_source
    from sepsnet.engines.stream import FrameStream
    from sepsnet.fileio import atomic_write_json
    from sepsnet.postprocess.writers import render_overlay

    predictor.timing = True  # per-stage timings in the JSON lines (on CUDA: a sync at each stage end)
    source = open_source(spec, pace=a.realtime)
    video = OverlayVideo(out / f"{name}_overlay.{a.video_format}", source.fps or 30.0)
    jsonl_path = out / f"{name}.jsonl"
    stream = FrameStream(predictor, source, deadline_ms=a.deadline_ms, track=a.track, max_frames=a.max_frames,
                         stall_timeout_s=a.stall_timeout, drop=True if a.realtime else None)
    show = a.show and _can_show()
    bar = tqdm(total=source.frame_count if a.max_frames is None else a.max_frames, unit="frame",
               desc=name, disable=a.no_progress, leave=True)
    stopped_by_user = False
    t0 = time.monotonic()
    with open(jsonl_path, "w", encoding="utf-8") as jsonl:
        try:
            for r in stream:
                overlay = render_overlay(r.rgb, r.result, predictor.classes)
                video.write(overlay)
                line = {"frame": r.index, "name": r.name, "captured_unix": round(r.captured_wall, 6),
                        "age_ms": round(r.age_ms, 3), "deadline_ms": a.deadline_ms, "missed": r.missed,
                        "timings_ms": {k: round(v * 1000, 3) for k, v in r.timings.items()},
                        "segments": _segments(r.result, predictor.classes)}
                jsonl.write(json.dumps(line) + "\n")
                jsonl.flush()
                bar.update(1)
                if show:
                    cv2.imshow("sepsnet-demo", overlay[..., ::-1])
                    if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                        stopped_by_user = True
                        break
        except KeyboardInterrupt:
            stopped_by_user = True
            print(f"\n{name}: interrupted; finishing the outputs", file=sys.stderr)
        finally:
            stream.close()
            bar.close()
            written = video.close()
            if show:
                cv2.destroyAllWindows()
    summary = stream.stats.summary(warmup=min(5, max(0, stream.stats.processed - 2)))
    summary.update({"input": spec, "end_reason": "stopped by the user" if stopped_by_user else stream.end_reason,
                    "deadline_ms": a.deadline_ms, "seconds": time.monotonic() - t0, "backend": predictor.backend_choice,
                    "video": str(written) if written else None, "jsonl": str(jsonl_path)})
    atomic_write_json(summary, out / f"{name}_summary.json")
    age = summary["age_ms"]
    print(f"{spec}: {summary['processed']} frames ({summary['frames_read']} read, {summary['dropped']} dropped, "
          f"{summary['bad']} bad, {summary['late']} late), {_fps(summary['fps'])} FPS, frame age p50 {age['p50']:.0f} "
          f"p99 {age['p99']:.0f} ms; {summary['end_reason']} -> {written or '(no frames)'}, {jsonl_path}")
    if stopped_by_user:
        raise KeyboardInterrupt


def _fps(fps: float) -> str:
    """FPS for the summary line; a stream too short for a steady-state rate says so."""
    return "n/a" if fps != fps else f"{fps:.1f}"


def _run_images(predictor: Any, items: list[tuple[str, str]], out: Path) -> list[str]:
    """Each image through the predictor; an unreadable or invalid image is reported and skipped
    (the others are still written). Returns the skipped paths with their reasons."""
    from sepsnet.data.coco_panoptic import read_rgb
    from sepsnet.postprocess.writers import CocoPanopticWriter, write_overlay

    writer = CocoPanopticWriter(out, predictor.classes)
    skipped: list[str] = []
    try:
        for i, (path, name) in enumerate(items):
            try:
                rgb = read_rgb(path)
                result = predictor(rgb).to("cpu")
            except DataError as e:
                skipped.append(f"{path}: {e}")
                print(f"skipped {path}: {e}", file=sys.stderr)
                continue
            writer.add(result, i, f"{name}{Path(path).suffix}")
            overlay = out / f"{name}_overlay.png"
            write_overlay(overlay, rgb, result, predictor.classes)
            names = [seg["category"] for seg in _segments(result, predictor.classes)]
            more = "..." if len(names) > 8 else ""
            print(f"{path}: {len(names)} segments ({', '.join(names[:8])}{more}), "
                  f"{result.timings['total'] * 1000:.0f} ms -> {overlay}")
    finally:  # what was predicted before an interrupt or an unexpected error is kept
        print(f"predictions: {writer.close()}")
    return skipped


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="export bundle folder (ONNX Runtime / TensorRT)")
    src.add_argument("--checkpoint", help="training checkpoint (eager PyTorch)")
    p.add_argument("--config", help="config for --checkpoint (default: the stored one)")
    p.add_argument("--backend", default="auto", help="auto (TensorRT, else ONNX Runtime CUDA, else CPU) | ort | trt")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", required=True)
    p.add_argument("--deadline-ms", type=float, default=None, help="per-frame latency budget (streams)")
    p.add_argument("--track", action="store_true", help="give thing segments a track_id across frames")
    p.add_argument("--show", action="store_true", help="show the overlay in a window (needs a display)")
    p.add_argument("--realtime", action="store_true",
                   help="read video files at their frame rate with latest-frame dropping, like a camera")
    p.add_argument("--max-frames", type=int, default=None, help="stop each stream after this many frames")
    p.add_argument("--stall-timeout", type=float, default=10.0,
                   help="seconds a camera/stream may deliver nothing (retried with back-off) before it ends")
    p.add_argument("--video-format", choices=("mp4", "avi"), default="mp4", help="overlay video container")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    a = p.parse_args(argv)
    preflight(out_dirs={"--out": a.out})  # before the model is loaded
    if a.deadline_ms is not None and not a.deadline_ms > 0:
        raise DataError(f"--deadline-ms must be > 0, got {a.deadline_ms}")
    if a.max_frames is not None and a.max_frames < 1:
        raise DataError(f"--max-frames must be >= 1, got {a.max_frames}")
    if not a.stall_timeout > 0:
        raise DataError(f"--stall-timeout must be > 0, got {a.stall_timeout}")

    from sepsnet.config import load_config
    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.outnames import unique_stems

    items = _expand(a.inputs)
    names = unique_stems([s for s, _ in items], [k for _, k in items])
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if a.bundle:
        predictor = PanopticPredictor.from_bundle(a.bundle, backend=a.backend, device=a.device)
    else:
        predictor = PanopticPredictor.from_checkpoint(a.checkpoint, load_config(a.config) if a.config else None,
                                                      device=a.device)
    print(f"runtime: {predictor.backend_choice}")
    images = [(s, n) for (s, k), n in zip(items, names) if k == "image"]
    skipped = _run_images(predictor, images, out) if images else []
    for (spec, kind), name in zip(items, names):
        if kind != "image":
            _run_stream(predictor, spec, name, out, a)
    if skipped:
        print(f"error: {len(skipped)} of {len(images)} images skipped (listed above)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
