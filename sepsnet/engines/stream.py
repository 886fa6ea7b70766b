"""Streaming runtime: frames from a source through a :class:`PanopticPredictor`, pipelined.

Four worker threads, joined by bounded queues (nothing grows without bound)::

    capture --[queue_size]--> preprocess --[1]--> dense engine --[1]--> post-processing --[1]--> consumer

* capture: reads the source. With ``drop=True`` (the default for cameras and streams) it keeps
  only the latest ``queue_size`` frames: a frame not yet picked up when a newer one arrives is
  dropped and counted, and at most ``max_in_flight`` (2) frames are between preprocessing and
  delivery, so a frame never waits behind a backlog of older ones (its age stays near two
  periods of the slowest stage). With ``drop=False`` (files, folders, iterables) it waits instead, so every
  frame is processed. A live source that stops delivering is retried with exponential back-off
  (``reopen`` between tries) until ``stall_timeout_s`` has passed without a frame, then the stream
  ends cleanly and ``end_reason`` says why.
* preprocess: ``predictor.prepare`` (resize + normalise into a tensor of its own), so frame n+1 is
  preprocessed while frame n is in the engines.
* dense engine: ``predictor.run_dense``; post-processing: ``predictor.finish`` (candidates,
  instance engine, fusion), then optional tracking. Frame n+1's dense engine runs while frame n is
  post-processed. (A predictor with only ``prepare`` + ``infer`` runs both in the first.)
* results come out in capture order, each with its capture time, its age at delivery and a
  deadline flag (:class:`StreamResult`). Bad frames (undecodable, wrong shape, NaN) are counted and
  skipped; they never stop the loop.

``close()`` (also on leaving a ``with`` block, on Ctrl-C in the consuming thread, or when the
consumer stops iterating) stops every thread and releases the source.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sepsnet.engines.sources import FrameSource, ReadFailed, open_source
from sepsnet.errors import FrameError
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.timing import FRAME_STAGES

STAGES = FRAME_STAGES  # recorded when the predictor times its stages (``predictor.timing``)
_END = object()  # end-of-stream marker passed down the queues
_POLL_S = 0.05  # how often blocked threads look at the stop flag
SAMPLES = 100_000  # latency samples kept for percentiles


@dataclass
class StreamResult:
    """One processed frame. ``index``: position in the source (dropped and bad frames leave gaps);
    ``captured``: ``time.monotonic()`` when it was read; ``captured_wall``: the same as Unix time;
    ``age_ms``: capture to delivery; ``missed``: ``age_ms`` > the deadline (False without one);
    ``timings``: seconds per stage, plus ``wait`` (capture to the start of preprocessing)."""

    index: int
    name: str | None
    frame: np.ndarray | None
    bgr: bool
    result: PanopticResult
    captured: float
    captured_wall: float
    age_ms: float = 0.0
    missed: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rgb(self) -> np.ndarray | None:
        """The frame in RGB order (None when frames are not kept)."""
        if self.frame is None:
            return None
        return np.ascontiguousarray(self.frame[..., ::-1]) if self.bgr else self.frame


@dataclass
class _Captured:
    index: int
    image: Any
    name: str | None
    captured: float
    captured_wall: float


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs}


@dataclass
class StreamStats:
    """Counters and latency samples of one stream (milliseconds in ``summary``)."""

    read: int = 0  # frames the source delivered
    processed: int = 0  # results delivered
    dropped: int = 0  # superseded by a newer frame before preprocessing (drop mode)
    late: int = 0  # delivered after the deadline
    bad: int = 0  # unusable frames, skipped
    failed_reads: int = 0  # reads that gave no frame (stall, disconnect)
    reconnects: int = 0  # successful reopen() calls of a live source
    # the latest SAMPLES values only: a camera may run for days
    ages_ms: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))
    stages_s: dict[str, deque] = field(default_factory=lambda: {s: deque(maxlen=SAMPLES) for s in STAGES})
    delivered_at: deque = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def fps(self, warmup: int = 0) -> float:
        """Throughput over the results after the first ``warmup`` (steady state)."""
        times = list(self.delivered_at)[warmup:]
        if len(times) < 2 or times[-1] <= times[0]:
            return float("nan")
        return (len(times) - 1) / (times[-1] - times[0])

    def summary(self, warmup: int = 0) -> dict[str, Any]:
        """Counters, steady-state FPS, frame-age and per-stage p50/p90/p99 (ms), deadline-miss rate."""
        ages = list(self.ages_ms)[warmup:]
        out: dict[str, Any] = {
            "frames_read": self.read, "processed": self.processed, "dropped": self.dropped, "late": self.late,
            "bad": self.bad, "failed_reads": self.failed_reads, "reconnects": self.reconnects,
            "fps": self.fps(warmup), "warmup": warmup,
            "age_ms": percentiles(ages),
            "miss_rate": (self.late / self.processed) if self.processed else 0.0,
            "drop_rate": (self.dropped / self.read) if self.read else 0.0,
        }
        out["stages_ms"] = {s: {k: v * 1000 for k, v in percentiles(list(vals)[warmup:], (50, 99)).items()}
                            for s, vals in self.stages_s.items() if vals}
        return out


class FrameStream:
    """Pipelined, deadline-aware panoptic inference on a stream of frames.

    ``source``: anything :func:`open_source` takes. ``deadline_ms``: per-frame latency budget from
    capture to delivery. ``drop``: latest-frame semantics (default: True for live sources).
    ``track``: give thing segments a ``track_id`` (``sepsnet.engines.tracking``; ``track_options``
    go to :class:`SegmentTracker`). ``keep_frames``: attach the frame to each result (for
    overlays). ``max_frames``: stop after this many frames read. ``max_in_flight``: frames taken
    into processing but not yet delivered (default 2 with ``drop``, else only the queues bound it).

    Use as an iterator (``for r in stream``), or ``run(callback)``; in a ``with`` block for a clean
    shutdown. ``stats`` holds the counters, ``end_reason`` why the stream ended.
    """

    def __init__(self, predictor: Any, source: Any, deadline_ms: float | None = None, queue_size: int = 1,
                 drop: bool | None = None, track: bool = False, track_options: dict[str, Any] | None = None,
                 keep_frames: bool = True, max_frames: int | None = None, stall_timeout_s: float = 10.0,
                 backoff_s: tuple[float, float] = (0.05, 2.0), bgr: bool | None = None,
                 max_in_flight: int | None = None) -> None:
        if deadline_ms is not None and not deadline_ms > 0:
            raise ValueError(f"deadline_ms must be > 0, got {deadline_ms}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.predictor = predictor
        self.source: FrameSource = open_source(source, bgr=bgr)
        self.bgr = self.source.bgr if bgr is None else bool(bgr)
        self.deadline_ms = deadline_ms
        self.drop = self.source.live if drop is None else bool(drop)
        self.keep_frames = keep_frames
        self.max_in_flight = max_in_flight if max_in_flight is not None else (2 if self.drop else None)
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._credits = threading.Semaphore(self.max_in_flight) if self.max_in_flight else None
        self.max_frames = max_frames
        self.stall_timeout_s = float(stall_timeout_s)
        self.backoff_s = backoff_s
        self.tracker = None
        if track:
            from sepsnet.engines.tracking import SegmentTracker

            self.tracker = SegmentTracker(**(track_options or {}))
        self.stats = StreamStats()
        self.end_reason: str | None = None
        self.error: BaseException | None = None
        self._frames: queue.Queue = queue.Queue(maxsize=queue_size)
        # without dropping, a frame is read only when the queue has room for it: its age then
        # counts from when the pipeline could take it, not from a read-ahead
        self._slots = threading.Semaphore(queue_size)
        self._prepared: queue.Queue = queue.Queue(maxsize=1)
        self._densed: queue.Queue = queue.Queue(maxsize=1)
        self._results: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._count_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._closed = False
        self._reading_since: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> FrameStream:
        if self._started:
            return self
        self._started = True
        for name, target in (("capture", self._capture_loop), ("preprocess", self._preprocess_loop),
                             ("dense", self._dense_loop), ("post", self._post_loop)):
            t = threading.Thread(target=self._guard(target), name=f"sepsnet-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop every thread (frames in flight are discarded) and release the source."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._end("closed")
        if not self._threads:
            self.source.close()  # else the capture thread releases it (when its blocking read returns)

    def __enter__(self) -> FrameStream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[StreamResult]:
        self.start()
        try:
            while True:
                item = self._next_result()
                if item is _END or item is None:
                    break
                self._deliver(item)
                yield item
        finally:
            self.close()
        if self.error is not None:
            raise self.error

    def run(self, callback: Callable[[StreamResult], Any] | None = None) -> StreamStats:
        """Consume the whole stream, calling ``callback`` on each result in order; returns the stats."""
        for r in self:
            if callback is not None:
                callback(r)
        return self.stats

    # -- threads -----------------------------------------------------------------------------
    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        """Run a stage; an unexpected error ends the stream (raised to the consumer), never hangs it."""
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # handed to the consuming thread
                if self.error is None:
                    self.error = exc
                    self.end_reason = f"error: {type(exc).__name__}: {exc}"  # wins over any other reason
                self._stop.set()
                self._put(self._results, _END, force=True)
        return run

    def _put(self, q: queue.Queue, item: Any, force: bool = False) -> bool:
        """Blocking put that gives up when the stream stops (``force``: the end marker, which
        replaces whatever waits so a stopping consumer still sees it)."""
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if force:
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                elif self._stop.is_set():
                    return False

    def _get(self, q: queue.Queue) -> Any:
        """Blocking get; None when the stream stopped."""
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set() and q.empty():
                    return None

    def _next_result(self) -> Any:
        """The next result; also the watchdog for a live source whose read blocks: after
        ``stall_timeout_s`` inside one read the stream ends (the capture thread is left to return)."""
        while True:
            try:
                return self._results.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set() and self._results.empty():
                    return None
                since = self._reading_since
                if self.source.live and since is not None and time.monotonic() - since > self.stall_timeout_s:
                    self._end(f"{self.source.name}: a read has blocked for more than "
                              f"{self.stall_timeout_s:.1f} s; stream ended")
                    self._stop.set()
                    return None

    def _end(self, reason: str) -> None:
        """Record why the stream ended; the first reason stays (an error overrides it)."""
        with self._count_lock:
            if self.end_reason is None:
                self.end_reason = reason

    def _acquire_slot(self) -> bool:
        while not self._slots.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                return False
        return True

    def _release_slot(self) -> None:
        if not self.drop:
            self._slots.release()

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def _capture_loop(self) -> None:
        index = 0
        last_frame = time.monotonic()
        delay = self.backoff_s[0]
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and index >= self.max_frames:
                    self._end(f"stopped after {self.max_frames} frames (max_frames)")
                    break
                if not self.drop and not self._acquire_slot():
                    break
                self._reading_since = time.monotonic()
                try:
                    got = self.source.read()
                except (FrameError, ReadFailed) as exc:
                    got = exc
                finally:
                    self._reading_since = None
                if isinstance(got, FrameError):
                    self._count("bad")
                    index += 1
                    self._release_slot()
                    continue
                if isinstance(got, ReadFailed):
                    self._release_slot()
                    self._count("failed_reads")
                    stalled = time.monotonic() - last_frame
                    if stalled > self.stall_timeout_s:
                        self._end(f"{self.source.name} delivered no frame for {stalled:.1f} s "
                                  f"({self.stats.failed_reads} failed reads, {self.stats.reconnects} "
                                  f"reconnects; last: {got}); stream ended")
                        break
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, self.backoff_s[1])
                    if self.source.live:
                        self._reading_since = time.monotonic()
                        try:
                            self.source.reopen()
                            self._count("reconnects")
                        except Exception:
                            pass  # still gone: the next read fails and backs off again
                        finally:
                            self._reading_since = None
                    continue
                if got is None:
                    self._end(f"end of {self.source.name}")
                    break
                last_frame = time.monotonic()
                delay = self.backoff_s[0]
                image, name = got
                self._count("read")
                item = _Captured(index, image, name, last_frame, time.time())
                index += 1
                if self.drop:
                    while True:  # latest-frame semantics: replace what nobody picked up yet
                        try:
                            self._frames.put_nowait(item)
                            break
                        except queue.Full:
                            try:
                                self._frames.get_nowait()
                                self._count("dropped")
                            except queue.Empty:
                                pass
                elif not self._put(self._frames, item):
                    break
        finally:
            self.source.close()  # this thread owns the source (OpenCV captures are not thread-safe)
            self._put(self._frames, _END)

    def _take_credit(self) -> bool:
        if self._credits is None:
            return True
        while not self._credits.acquire(timeout=_POLL_S):
            if self._stop.is_set():
                return False
        return True

    def _give_credit(self) -> None:
        if self._credits is not None:
            self._credits.release()

    def _preprocess_loop(self) -> None:
        while True:
            if not self._take_credit():  # wait for room downstream before taking the newest frame
                self._put(self._prepared, _END)
                return
            item = self._get(self._frames)
            if item is None or item is _END:
                self._put(self._prepared, _END)
                return
            self._release_slot()
            start = time.monotonic()
            try:
                prepared = self.predictor.prepare(item.image, self.bgr)
            except FrameError:
                self._count("bad")
                self._give_credit()
                continue
            if not self._put(self._prepared, (item, prepared, start - item.captured)):
                return

    def _dense_loop(self) -> None:
        split = hasattr(self.predictor, "run_dense") and hasattr(self.predictor, "finish")
        while True:
            got = self._get(self._prepared)
            if got is None or got is _END:
                self._put(self._densed, _END)
                return
            item, prepared, wait = got
            try:
                done = self.predictor.run_dense(prepared) if split else self.predictor.infer(prepared)
            except FrameError:
                self._count("bad")
                self._give_credit()
                continue
            if not self._put(self._densed, (item, prepared, wait, split, done)):
                return

    def _post_loop(self) -> None:
        while True:
            got = self._get(self._densed)
            if got is None or got is _END:
                self._put(self._results, _END, force=True)
                return
            item, prepared, wait, split, done = got
            try:
                result = self.predictor.finish(prepared, *done) if split else done
            except FrameError:
                self._count("bad")
                self._give_credit()
                continue
            if self.tracker is not None:
                self.tracker.update(result)
            timings = dict(result.timings)
            timings["wait"] = wait
            out = StreamResult(item.index, item.name, item.image if self.keep_frames else None, self.bgr,
                               result, item.captured, item.captured_wall, timings=timings)
            if not self._put(self._results, out):
                return
            self._give_credit()

    def _deliver(self, r: StreamResult) -> None:
        """Age, deadline flag and counters, at the moment the consumer receives the result."""
        now = time.monotonic()
        r.age_ms = (now - r.captured) * 1000.0
        r.missed = self.deadline_ms is not None and r.age_ms > self.deadline_ms
        s = self.stats
        with self._count_lock:
            s.processed += 1
            s.late += int(r.missed)
            s.ages_ms.append(r.age_ms)
            s.delivered_at.append(now)
            for stage in STAGES:
                if stage in r.timings:
                    s.stages_s[stage].append(r.timings[stage])
