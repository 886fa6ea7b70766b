"""Frame sources for the streaming runtime (``sepsnet.engines.stream``).

A source hands out frames one ``read()`` at a time:

* ``read()`` returns ``(image, name)`` (HxWx3 uint8; ``name`` is a file name or None), or ``None``
  when the source has ended (end of a video file, last image, exhausted iterable);
* it raises :class:`FrameError` for one unusable frame (an undecodable image file): counted as bad
  and skipped;
* it raises :class:`ReadFailed` when no frame came (a camera or network stream that stalled or
  disconnected): live sources are retried with back-off and ``reopen()``.

``open_source`` turns what a user names (a camera index, a video file, an OpenCV URL/GStreamer
pipeline string, a directory or glob of images, a Python iterable) into one of these; any object
with the same attributes and methods (``name``, ``live``, ``bgr``, ``fps``, ``frame_count``,
``read``, ``reopen``, ``close``) works as a custom source.
"""
from __future__ import annotations

import glob
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from sepsnet.errors import FrameError, SourceError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv", ".h264",
                  ".h265", ".mjpg", ".mjpeg")
Frame = tuple[np.ndarray, str | None]


class ReadFailed(Exception):
    """No frame came from a live source this time (stall or disconnect); the runner retries."""


class FrameSource(Protocol):
    name: str
    live: bool  # a camera or network stream: latest-frame semantics, stall retries
    bgr: bool  # frames are in OpenCV's BGR order
    fps: float | None
    frame_count: int | None

    def read(self) -> Frame | None: ...

    def reopen(self) -> None: ...

    def close(self) -> None: ...


def looks_like_stream(spec: str) -> bool:
    """A URL (``rtsp://``, ``http://``, ``file://`` ...) or a GStreamer pipeline (``... ! appsink``)."""
    return "://" in spec or "!" in spec


class VideoCaptureSource:
    """``cv2.VideoCapture`` on a video file, a camera index, a URL or a GStreamer pipeline.

    Files end at their last frame (a frame that fails to decode before it is counted and skipped);
    cameras and streams are ``live``: a failed read raises :class:`ReadFailed` and ``reopen``
    reconnects. ``pace=True`` (files) delivers frames at the file's frame rate, like a camera.
    """

    def __init__(self, spec: str | int, pace: bool = False, fps: float | None = None) -> None:
        self.spec = spec
        if isinstance(spec, int):
            self.kind, self.name = "camera", f"camera{spec}"
        elif looks_like_stream(spec):
            self.kind, self.name = "stream", spec
        else:
            self.kind, self.name = "file", str(spec)
        self.live = self.kind != "file"
        self.bgr = True
        self.cap = self._open()
        reported = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps or (reported if 0.0 < reported < 1000.0 else None)
        count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count = count if self.kind == "file" and count > 0 else None
        self.pace = pace and self.kind == "file"
        self._next_time: float | None = None
        self._position = 0
        self._failures = 0

    def _open(self) -> cv2.VideoCapture:
        if isinstance(self.spec, str) and "appsink" in self.spec:
            cap = cv2.VideoCapture(self.spec, cv2.CAP_GSTREAMER)
        else:
            cap = cv2.VideoCapture(self.spec)
        if not cap.isOpened():
            cap.release()
            hint = ""
            if isinstance(self.spec, str) and "!" in self.spec:
                hint = " (a GStreamer pipeline needs an OpenCV built with GStreamer, e.g. JetPack's; " \
                       "pip's opencv-python-headless has none)"
            raise SourceError(f"cannot open {self.kind} {self.spec!r}{hint}")
        return cap

    def read(self) -> Frame | None:
        if self.pace and self.fps:
            now = time.monotonic()
            self._next_time = self._next_time or now
            if self._next_time > now:
                time.sleep(self._next_time - now)
            self._next_time += 1.0 / self.fps
        ok, frame = self.cap.read()
        if ok and frame is not None:
            self._failures = 0
            self._position += 1
            return frame, None
        if self.live:
            raise ReadFailed(f"{self.name}: no frame")
        # a file: the end, unless frames remain after one that does not decode
        self._failures += 1
        remaining = self.frame_count is not None and self._position + self._failures < self.frame_count
        if remaining and self._failures <= 3:
            raise FrameError(f"{self.name}: frame {self._position + self._failures - 1} does not decode")
        return None

    def reopen(self) -> None:
        self.cap.release()
        self.cap = self._open()

    def close(self) -> None:
        self.cap.release()


class ImageFilesSource:
    """Image files in a given order (a directory's images sorted by name, or a glob's matches)."""

    live = False
    bgr = True
    fps = None

    def __init__(self, paths: list[Path], name: str) -> None:
        if not paths:
            raise SourceError(f"no images in {name} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.paths, self.name = paths, name
        self.frame_count = len(paths)
        self._i = 0

    def read(self) -> Frame | None:
        if self._i >= len(self.paths):
            return None
        path = self.paths[self._i]
        self._i += 1
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise FrameError(f"cannot decode image {path}")
        return image, path.name

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class IterableSource:
    """Frames from any Python iterable (a list, a generator, a ROS callback queue...).

    Items are HxWx3 arrays (RGB unless ``bgr=True``) or ``(array, name)`` pairs. An exception from
    the iterator counts as a failed read; a finished iterator ends the stream.
    """

    def __init__(self, frames: Iterable[Any], bgr: bool = False, live: bool = False, name: str = "frames",
                 fps: float | None = None) -> None:
        self._it: Iterator[Any] = iter(frames)
        self.bgr, self.live, self.name, self.fps = bgr, live, name, fps
        self.frame_count = len(frames) if hasattr(frames, "__len__") else None

    def read(self) -> Frame | None:
        try:
            item = next(self._it)
        except StopIteration:
            return None
        except Exception as exc:
            raise ReadFailed(f"{self.name}: {type(exc).__name__}: {exc}") from None
        if isinstance(item, tuple) and len(item) == 2:
            return item[0], item[1]
        return item, None

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


def image_files(spec: str) -> list[Path] | None:
    """The image files a directory or glob names (sorted), or None when ``spec`` is neither."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if any(c in spec for c in "*?["):
        return sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    return None


def classify(spec: str | int) -> str:
    """``camera``, ``stream``, ``images`` (directory/glob), ``image`` (one file), ``video`` or
    ``missing``: what a command-line input names."""
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit() and not Path(spec).exists()):
        return "camera"
    if looks_like_stream(spec):
        return "stream"
    path = Path(spec)
    if path.is_dir() or (not path.exists() and any(c in spec for c in "*?[")):
        return "images"
    if not path.is_file():
        return "missing"
    return "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"


def open_source(spec: Any, bgr: bool | None = None, pace: bool = False, fps: float | None = None) -> FrameSource:
    """A source from a camera index (``0`` or ``"0"``), a video file, a URL / GStreamer pipeline
    string, a directory or glob of images, a Python iterable of frames, or a ready source object.
    ``pace``: read a video file at its frame rate (or ``fps``), as a camera would deliver it."""
    if hasattr(spec, "read") and hasattr(spec, "live"):
        return spec
    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, (str, int)):
        kind = classify(spec)
        if kind == "camera":
            return VideoCaptureSource(int(spec))
        if kind in ("stream", "video"):
            return VideoCaptureSource(spec, pace=pace, fps=fps)
        if kind == "images":
            return ImageFilesSource(image_files(spec) or [], spec)
        if kind == "image":
            return ImageFilesSource([Path(spec)], spec)
        raise SourceError(f"no such file, directory, camera index or stream: {spec!r}")
    if isinstance(spec, np.ndarray):
        raise SourceError("a single array is not a stream; pass a list of frames (or call the predictor)")
    if isinstance(spec, Iterable):
        return IterableSource(spec, bgr=bool(bgr), fps=fps)
    raise SourceError(f"cannot stream from a {type(spec).__name__}")
