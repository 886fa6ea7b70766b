"""Streaming runtime on CPU, no camera: a real video file, a scripted live source (corrupt frame,
stall, disconnect), a slow backend (dropping, deadline accounting), shutdown, the demo and bench CLIs."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from sepsnet.config import load_config, parse_overrides
from sepsnet.engines.predictor import PanopticPredictor
from sepsnet.engines.sources import ReadFailed, open_source
from sepsnet.engines.stream import FrameStream
from sepsnet.errors import EngineError, FrameError, SourceError
from sepsnet.model import build_model
from sepsnet.postprocess.timing import FRAME_STAGES
from sepsnet.train.checkpoint import save_checkpoint

from _samples import COCO_IMAGES

ROOT = Path(__file__).parents[1]
FRAME_HW = (96, 160)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides([
        "data.min_size_test=96", "data.max_size_test=160", "postprocess.score_thresh=0.005",
        "postprocess.instance_score_thresh=0.0", "postprocess.stuff_area_limit=16", "postprocess.max_instances=10"]))
    torch.manual_seed(7)
    return save_checkpoint(tmp_path_factory.mktemp("stream") / "tiny.pt", model=build_model(cfg), cfg=cfg, iteration=0)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> PanopticPredictor:
    return PanopticPredictor.from_checkpoint(checkpoint, device="cpu")


def photo_frames(n: int) -> list[np.ndarray]:
    """``n`` BGR frames from the sample photos, panning right by 3 px per frame."""
    photos = [cv2.resize(cv2.imread(str(p)), FRAME_HW[::-1], interpolation=cv2.INTER_AREA) for p in COCO_IMAGES]
    return [np.ascontiguousarray(np.roll(photos[i % len(photos)], 3 * i, axis=1)) for i in range(n)]


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, FRAME_HW[::-1])
    assert writer.isOpened()
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_video_file_through_the_loop_in_order(predictor: PanopticPredictor, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.avi", photo_frames(6))
    predictor.timing = True  # per-stage timings (opt-in)
    try:
        with FrameStream(predictor, video) as stream:
            results = list(stream)
    finally:
        predictor.timing = False
    assert [r.index for r in results] == list(range(6))  # every frame (files do not drop), in order
    s = stream.stats
    assert (s.read, s.processed, s.dropped, s.bad, s.late) == (6, 6, 0, 0, 0)
    assert stream.end_reason == f"end of {video}"
    for r in results:
        assert r.result.id_map.shape == FRAME_HW and r.frame.shape == (*FRAME_HW, 3)
        assert r.age_ms >= (r.timings["dense"] + r.timings["preprocess"]) * 1000 and not r.missed
        assert set(r.timings) >= {*FRAME_STAGES, "total", "wait"}
    # the pipelined result equals the predictor called on the same decoded frame
    cap = cv2.VideoCapture(str(video))
    first = cap.read()[1]
    cap.release()
    assert torch.equal(predictor(first, bgr=True).id_map, results[0].result.id_map)
    summary = stream.stats.summary()
    assert summary["processed"] == 6 and summary["age_ms"]["p99"] >= summary["age_ms"]["p50"] > 0
    assert set(summary["stages_ms"]["dense"]) == {"p50", "p99"}


class ScriptedCamera:
    """A live source playing a script: frames, a corrupt frame, a stall (failed reads), then a
    disconnect (every read fails, reopening does not help)."""

    live, bgr, fps, frame_count, name = True, True, None, None, "scripted-camera"

    def __init__(self, script: list[str], frames: list[np.ndarray]) -> None:
        self.script, self.frames = list(script), frames
        self.reopened = 0
        self.closed = False
        self.i = 0

    def read(self):
        step = self.script.pop(0) if self.script else "gone"
        if step == "frame":
            self.i += 1
            return self.frames[self.i % len(self.frames)], f"f{self.i}"
        if step == "corrupt":  # decodes, but to a useless 2x2 image: the predictor refuses it
            return np.zeros((2, 2, 3), np.uint8), "corrupt"
        if step == "undecodable":
            raise FrameError("jpeg data is truncated")
        raise ReadFailed(step)

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> None:
        self.closed = True


def test_corrupt_frame_stall_and_disconnect(predictor: PanopticPredictor) -> None:
    script = ["frame", "corrupt", "frame", "stall", "stall", "stall", "frame", "undecodable", "frame"]
    cam = ScriptedCamera(script, photo_frames(2))
    stream = FrameStream(predictor, cam, drop=False, stall_timeout_s=0.3, backoff_s=(0.01, 0.05))
    results = list(stream)
    s = stream.stats
    assert [r.name for r in results] == ["f1", "f2", "f3", "f4"]  # the bad ones skipped, the loop went on
    assert s.bad == 2 and s.read == 5 and s.processed == 4  # "corrupt" was read, then refused
    assert s.failed_reads > 3 and cam.reopened == s.reconnects >= 3  # the stall was retried, reopening
    assert "delivered no frame" in stream.end_reason and "stream ended" in stream.end_reason  # disconnect: clean end
    assert cam.closed and not any(t.is_alive() for t in stream._threads)


def test_backoff_grows_between_retries(predictor: PanopticPredictor) -> None:
    cam = ScriptedCamera(["frame"], photo_frames(1))
    stamps: list[float] = []
    cam.reopen = lambda: stamps.append(time.monotonic())  # type: ignore[method-assign]
    stream = FrameStream(predictor, cam, stall_timeout_s=0.5, backoff_s=(0.02, 0.16))
    assert len(list(stream)) == 1
    gaps = np.diff(stamps)
    assert len(gaps) >= 3 and gaps[2] > gaps[0]  # 0.04, 0.08, 0.16... (waits are lower bounds)


class SlowDense:
    """The real dense backend, made slow: stands for an engine slower than the camera."""

    thread_safe = True

    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds = inner, seconds
        self.name, self.device = "slow-" + inner.name, inner.device

    def run(self, feeds):
        time.sleep(self.seconds)
        return self.inner.run(feeds)


def camera_like(frames: list[np.ndarray], period_s: float, n: int):
    for i in range(n):
        time.sleep(period_s)
        yield frames[i % len(frames)]


def test_slow_backend_drops_stale_frames_and_flags_deadlines(predictor: PanopticPredictor) -> None:
    slow = PanopticPredictor(SlowDense(predictor.dense, 0.06), predictor.instance, predictor.data,
                             predictor.postprocess, predictor.classes)
    frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in photo_frames(2)]
    from sepsnet.engines.sources import IterableSource

    source = IterableSource(camera_like(frames, 0.004, 60), live=True, name="fast-camera")
    stream = FrameStream(slow, source, deadline_ms=40)
    results = list(stream)
    s = stream.stats
    assert stream.drop and s.read == 60 and s.dropped > 0  # latest-frame semantics: the backlog is dropped
    assert s.read == s.processed + s.dropped + s.bad  # every frame accounted for
    assert [r.index for r in results] == sorted(r.index for r in results)  # in order
    assert all(r.age_ms >= 60 and r.missed for r in results)  # the 60 ms engine alone misses a 40 ms deadline
    assert s.late == s.processed == len(results)
    assert stream.stats.summary()["miss_rate"] == 1.0
    assert stream.max_in_flight == 2  # no backlog of old frames behind the slow engine


def test_close_and_ctrl_c_stop_every_thread(predictor: PanopticPredictor) -> None:
    frames = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in photo_frames(2)]

    def forever():
        while True:
            time.sleep(0.002)
            yield frames[0]

    stream = FrameStream(predictor, forever(), drop=True)
    got = 0
    with pytest.raises(KeyboardInterrupt):
        with stream:
            for _ in stream:
                got += 1
                if got == 2:
                    raise KeyboardInterrupt  # what Ctrl-C raises in the consuming thread
    assert got == 2 and not any(t.is_alive() for t in stream._threads)
    assert stream.end_reason == "closed"
    stream2 = FrameStream(predictor, forever())
    it = iter(stream2)
    next(it)
    it.close()  # a consumer that stops iterating (break) closes the stream too
    assert not any(t.is_alive() for t in stream2._threads)


def test_engine_error_reaches_the_consumer(predictor: PanopticPredictor) -> None:
    class Broken:
        thread_safe, name, device = True, "broken", torch.device("cpu")

        def run(self, feeds):
            raise EngineError("engine fell over")

    bad = PanopticPredictor(Broken(), predictor.instance, predictor.data, predictor.postprocess, predictor.classes)
    stream = FrameStream(bad, photo_frames(3), bgr=True)
    with pytest.raises(EngineError, match="fell over"):
        list(stream)
    assert "engine fell over" in stream.end_reason and not any(t.is_alive() for t in stream._threads)


def test_sources(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(photo_frames(3)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    (folder / "001b.png").write_bytes(b"\x89PNG truncated")
    src = open_source(folder)
    reads = []
    while True:
        try:
            got = src.read()
        except FrameError as exc:
            reads.append(str(exc))
            continue
        if got is None:
            break
        reads.append(got[1])
    assert reads[:2] == ["000.png", "001.png"] and "cannot decode" in reads[2] and reads[3] == "002.png"
    assert open_source(str(folder / "*.png")).frame_count == 4
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.mp4")
    with pytest.raises(FrameError, match="cannot decode"):
        open_source(folder / "001b.png").read()
    (tmp_path / "x.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="cannot open"):
        open_source(tmp_path / "x.mp4")
    with pytest.raises(SourceError, match="cannot open camera"):
        open_source("97")  # no camera 97 here


def test_device_and_backend_choice(checkpoint: Path, tmp_path: Path) -> None:
    from sepsnet.engines.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(EngineError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            resolve_device("cuda:1")
    pred = PanopticPredictor.from_checkpoint(checkpoint, device="cpu")
    assert pred.backend_choice == "torch-cpu on cpu"


def test_threads_share_one_predictor(predictor: PanopticPredictor) -> None:
    """No global lock: two threads run the same predictor at once and get the single-thread results."""
    frames = photo_frames(2)
    ref = [predictor(f, bgr=True).id_map for f in frames]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for _ in range(2):
                assert torch.equal(predictor(frames[k], bgr=True).id_map, ref[k])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_demo_on_a_video_writes_a_playable_overlay_and_json_lines(checkpoint: Path, tmp_path: Path) -> None:
    from sepsnet.cli.demo import main

    video = write_video(tmp_path / "drive.avi", photo_frames(5))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out), "--track",
                 "--deadline-ms", "60000", "--no-progress", str(video)]) == 0
    overlay = out / "drive_overlay.mp4"
    assert count_frames(overlay) == 5 == count_frames(video)
    lines = [json.loads(x) for x in (out / "drive.jsonl").read_text().splitlines()]
    assert [x["frame"] for x in lines] == list(range(5))
    assert all(x["missed"] is False and x["deadline_ms"] == 60000 and "dense" in x["timings_ms"] for x in lines)
    assert all("track_id" in s for x in lines for s in x["segments"] if s["isthing"])
    summary = json.loads((out / "drive_summary.json").read_text())
    assert summary["processed"] == 5 and summary["end_reason"].startswith("end of")
    assert not list(out.glob(".*partial*"))


def test_demo_equal_stems_do_not_overwrite(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.demo import main

    frames = photo_frames(2)
    for sub, f in zip(("a", "b"), frames):
        (tmp_path / sub).mkdir()
        cv2.imwrite(str(tmp_path / sub / "frame.png"), f)
    out = tmp_path / "out"
    a, b = str(tmp_path / "a" / "frame.png"), str(tmp_path / "b" / "frame.png")
    assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out), a, b]) == 0
    assert (out / "a_frame_overlay.png").is_file() and (out / "b_frame_overlay.png").is_file()
    doc = json.loads((out / "panoptic_predictions.json").read_text())
    assert sorted(x["file_name"] for x in doc["annotations"]) == ["a_frame.png", "b_frame.png"]
    pngs = [cv2.imread(str(out / "panoptic_predictions" / n)) for n in ("a_frame.png", "b_frame.png")]
    assert all(p is not None for p in pngs)
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2"), a, a]) == 2  # same input twice
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("frame.png") >= 2 and "Traceback" not in err


def test_output_names() -> None:
    from sepsnet.errors import DataError
    from sepsnet.outnames import unique_stems

    assert unique_stems(["x/a/frame.png", "x/b/frame.png", "c.png"]) == ["a_frame", "b_frame", "c"]
    assert unique_stems(["p/x/f.png", "q/x/f.png"]) == ["p_x_f", "q_x_f"]
    assert unique_stems(["d/f.png", "d/f.jpg"]) == ["d_f_png", "d_f_jpg"]
    assert unique_stems(["0", "rtsp://cam/1"], ["camera", "stream"]) == ["camera0", "rtsp_cam_1"]
    with pytest.raises(DataError, match="'d/f.png' and input 'd/./f.png' are the same|would write"):
        unique_stems(["d/f.png", "d/./f.png"])


def test_writer_refuses_to_overwrite(predictor: PanopticPredictor, tmp_path: Path) -> None:
    from sepsnet.errors import DataError
    from sepsnet.postprocess.writers import CocoPanopticWriter

    result = predictor(photo_frames(1)[0], bgr=True)
    writer = CocoPanopticWriter(tmp_path, predictor.classes)
    writer.add(result, 1, "a/frame.png")
    with pytest.raises(DataError, match="'b/frame.png' would overwrite frame.png written for 'a/frame.png'"):
        writer.add(result, 2, "b/frame.png")


def test_bench_on_video_and_images(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.bench import main

    video = write_video(tmp_path / "clip.avi", photo_frames(6))
    out = tmp_path / "b.json"
    assert main([str(checkpoint), "--video", str(video), "--deadline-ms", "100000", "--warmup", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "stream" and data["processed"] == 6 and data["dropped"] == 0 and data["miss_rate"] == 0.0
    assert data["fps"] > 0 and data["age_ms"]["p99"] >= data["age_ms"]["p50"] > 0
    assert set(data["stages_ms"]["dense"]) == {"p50", "p99"}
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(photo_frames(3)):
        cv2.imwrite(str(folder / f"{i}.jpg"), f)
    assert main([str(checkpoint), "--images", str(folder), "--warmup", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["processed"] == 3
    assert "frame age" in capsys.readouterr().out
    assert main([str(checkpoint), "--video", str(tmp_path / "missing.avi")]) == 2
    assert main([str(checkpoint), "--video", str(video), "--deadline-ms", "0"]) == 2


def test_demo_ctrl_c_leaves_a_playable_video(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.demo import main
    from sepsnet.postprocess import writers

    video = write_video(tmp_path / "long.avi", photo_frames(8))
    real, calls = writers.render_overlay, []

    def render_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the 4th frame is drawn
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "render_overlay", render_then_ctrl_c)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out), "--show", "--no-progress",
                 str(video)]) == 130
    err = capsys.readouterr().err
    assert "--show: no display" in err and "interrupted" in err
    assert count_frames(out / "long_overlay.mp4") == 3  # finished and playable, nothing half-written
    assert len((out / "long.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "long_summary.json").read_text())["end_reason"] == "stopped by the user"
