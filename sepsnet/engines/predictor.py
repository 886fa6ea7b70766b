"""``PanopticPredictor``: frame in, panoptic result out, for a camera loop.

Preprocess exactly as evaluation (shorter edge to ``min_size_test`` capped by ``max_size_test``,
fitted into a static bundle's input size), dense engine, the shared post-processing
(``sepsnet.postprocess.pipeline``) with the instance engine, results at the frame's resolution.
A bad frame raises :class:`FrameError` and leaves the predictor ready for the next one.

Concurrency: one predictor may be called from several threads. The reused input buffers are
per thread; pre- and post-processing run concurrently; the engines run concurrently when both
backends are ``thread_safe`` (ONNX Runtime, eager torch) and take turns otherwise (TensorRT: one
execution context; give each thread its own predictor to run TensorRT engines in parallel).
:meth:`prepare` + :meth:`infer` split a frame in two so a streaming loop can preprocess frame n+1
while frame n is inferred (``sepsnet.engines.stream``).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sepsnet.config import DataConfig, PostprocessConfig, SEPSNetConfig, config_from_dict
from sepsnet.data.transforms import inference_sizes, write_input, zero_padding
from sepsnet.engines.backend import Backend
from sepsnet.engines.device import resolve_device
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.preselect import Preselect, check_preselect
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.threads import intra_op_threads
from sepsnet.postprocess.timing import StageTimer

PathLike = str | Path
log = logging.getLogger("sepsnet")


@dataclass
class PreparedFrame:
    """A preprocessed frame owned by its caller (not a reused buffer): the (1,3,H,W) engine input,
    ((resized h, w), (original h, w)) and the seconds preprocessing took."""

    image: torch.Tensor
    sizes: tuple[tuple[int, int], tuple[int, int]]
    seconds: float = 0.0


class FrameRangeWarning(UserWarning):
    """A float frame whose values look like 0..1 (the predictor reads float frames as 0..255)."""


def validate_frame(frame: Any) -> np.ndarray:
    """HxWx3 uint8 (or finite float 0..255) -> uint8 array; FrameError naming the problem.

    A grey frame (HxW or HxWx1, e.g. a mono camera) is replicated into the three channels."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array (HxWx3), got {type(frame).__name__}")
    grey = frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1)
    if not grey and (frame.ndim != 3 or frame.shape[2] != 3):
        raise FrameError(f"frame must have shape HxWx3 (or HxW grey), got {frame.shape}")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise FrameError(f"frame is empty or too small: {frame.shape}")
    if frame.dtype != np.uint8:
        if not np.issubdtype(frame.dtype, np.floating):
            raise FrameError(f"frame dtype must be uint8 (or float 0..255), got {frame.dtype}")
        if not np.isfinite(frame).all():
            raise FrameError("frame contains NaN or Inf values")
        if 0.0 < float(frame.max()) <= 1.0:  # a dark 0..255 frame would be black: a 0..1 frame, likely
            warnings.warn("float frame with values in 0..1: PanopticPredictor reads float frames as 0..255 "
                          "(multiply by 255)", FrameRangeWarning, stacklevel=3)
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    if grey:
        frame = np.repeat(frame.reshape(frame.shape[0], frame.shape[1], 1), 3, axis=2)
    return frame


class PanopticPredictor:
    """Run a dense + instance backend pair with the shared post-processing."""

    def __init__(self, dense: Backend, instance: Backend, data: DataConfig, postprocess: PostprocessConfig,
                 classes: dict[str, Any], input_hw: tuple[int, int] | None = None,
                 preselect: Preselect | dict[str, Any] | None = None, timing: bool = False) -> None:
        """``preselect``: the :class:`Preselect` (or the manifest's mapping) when the dense engine keeps
        only the top-k locations per level (checked against ``postprocess`` here, not at the first
        frame). ``timing``: fill ``result.timings`` per stage (on CUDA this synchronises the device
        at every stage end; off, a frame only records its ``total``)."""
        self.preselect = Preselect.coerce(preselect, "manifest preselect")
        check_preselect(self.preselect, postprocess)
        self.timing = timing
        self.return_masks = True  # instance masks as crops per box (PanopticResult.masks)
        #: torch intra-op threads for the post-processing of a frame (None: torch's setting). Set on the
        #: calling thread around :meth:`finish` only (OpenMP's thread count is per calling thread).
        self.postprocess_threads: int | None = None
        # run the instance engine only on candidates that can enter the panoptic result (same panoptic
        # output; instance lists hold only those): for camera loops that do not need mask AP
        self.panoptic_only = False
        #: post-processing path (``panoptic_inference(device_path=)``): None = the fixed-shape device path
        #: with one host read per frame for dense outputs on CUDA, the host path otherwise; True/False force it
        self.device_path: bool | None = None
        self.dense, self.instance = dense, instance
        self.data, self.postprocess = data, postprocess
        self.classes = classes
        self.num_stuff = len(classes["stuff"])
        self.input_hw = input_hw
        self._local = threading.local()  # per-thread input buffer / pinned staging
        # engines that are not thread-safe (TensorRT: one execution context each) take turns, per engine
        self._dense_lock: Any = contextlib.nullcontext() if getattr(dense, "thread_safe", False) else threading.Lock()
        self._instance_lock: Any = (contextlib.nullcontext() if getattr(instance, "thread_safe", False)
                                    else threading.Lock())
        device = getattr(dense, "device", torch.device("cpu"))
        self.preprocess_on = "device" if torch.device(device).type == "cuda" else "opencv"
        #: how the backend was chosen (set by ``from_bundle``), e.g. "onnxruntime-cpu (auto: ...)"
        self.backend_choice = f"{getattr(dense, 'name', type(dense).__name__)} on {device}"

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: PathLike, backend: str = "auto", threads: int | None = None,
                    cuda_graph: bool = False, graphs: dict[str, str] | None = None,
                    device: str | int | torch.device = "auto") -> PanopticPredictor:
        """``backend``: ``auto`` picks TensorRT (the bundle has plans, TensorRT imports, a GPU is
        visible), then ONNX Runtime with CUDA (onnxruntime-gpu and a GPU), then ONNX Runtime on the
        CPU, and records why in ``backend_choice`` (also logged); or ``ort`` / ``trt``.
        ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or N: the GPU both engines run on.
        ``path``: bundle folder, manifest or a file inside it.
        ``cuda_graph``: TensorRT only, capture the static-shape dense engine in a CUDA graph.
        ``graphs``: ONNX Runtime only, ``{"dense": file, "instance": file}`` of the bundle to run
        instead of the fp32 ``onnx`` graphs (e.g. the fp16 / int8 engine graphs, to measure their
        accuracy: ``sepsnet.eval.bundle_eval``)."""
        from sepsnet.export.bundle import has_plans, verify_bundle

        root = Path(path)
        root = root.parent if root.is_file() else root
        manifest = verify_bundle(root)
        auto_device = isinstance(device, str) and device.strip().lower() == "auto"
        target = resolve_device(device)
        why = f"backend={backend!r}"
        if backend == "auto":
            backend, why = _auto_backend(has_plans(manifest), target)
        graphs_override, graphs = graphs, manifest["graphs"]
        if graphs_override is not None:
            listed = set(manifest["files"])
            bad = [f for f in graphs_override.values() if f not in listed]
            if backend != "ort" or set(graphs_override) != {"dense", "instance"} or bad:
                raise BundleError(f"{root}: graphs={graphs_override} must name a dense and an instance graph "
                                  f"listed in the manifest and needs backend='ort' (unknown: {bad})")
        if backend == "trt":
            from sepsnet.engines.trt_backend import TrtBackend
            from sepsnet.export.engine_guard import check_plan_compatible, current_runtime

            if not has_plans(manifest):
                raise BundleError(f"{root} has no TensorRT plans; build them with `sepsnet-export --from-onnx {root}`")
            if target.type == "cuda":
                with torch.cuda.device(target):  # TensorRT here + the compute capability of the device that runs
                    runtime = current_runtime()
            else:
                runtime = current_runtime()
            check_plan_compatible(manifest, runtime, str(root))  # the guard's message first: what to rebuild
            if target.type != "cuda":
                raise EngineError(f"backend='trt' needs a CUDA GPU, but device={device!r} resolves to {target}")
            plugin = root / manifest["plugin"] if manifest.get("plugin") else None
            vc = bool(manifest["engine"]["version_compatible"])
            dense: Backend = TrtBackend(root / graphs["dense"]["plan"], plugin, device=runtime.device,
                                        cuda_graph=cuda_graph, version_compatible=vc)
            instance: Backend = TrtBackend(root / graphs["instance"]["plan"], plugin, device=runtime.device,
                                           version_compatible=vc)
        elif backend == "ort":
            from sepsnet.engines.ort_backend import OrtBackend

            chosen = graphs_override or {k: graphs[k]["onnx"] for k in ("dense", "instance")}
            ort_device: str | torch.device = "auto" if auto_device else target
            dense = OrtBackend(root / chosen["dense"], device=ort_device, threads=threads)
            instance = OrtBackend(root / chosen["instance"], device=ort_device, threads=threads)
        else:
            raise EngineError(f"unknown backend {backend!r} (auto, ort, trt)")
        cfg = config_from_dict(manifest["config"], where=f"{root}/manifest.json")
        post = PostprocessConfig(**manifest.get("postprocess", {}))
        inp = manifest["input"]
        input_hw = None if inp.get("dynamic") else (int(inp["height"]), int(inp["width"]))
        predictor = cls(dense, instance, cfg.data, post, manifest["classes"], input_hw, manifest.get("preselect"))
        if backend == "ort" and target.type == "cuda" and dense.device.type != "cuda":
            why += "; onnxruntime has no CUDAExecutionProvider (install the `gpu` extra for onnxruntime-gpu)"
        predictor.backend_choice = f"{dense.name} on {dense.device} ({why})"
        log.info("sepsnet runtime: %s", predictor.backend_choice)
        return predictor

    @classmethod
    def from_checkpoint(cls, path: PathLike, config: SEPSNetConfig | None = None,
                        device: str | int | torch.device | None = None) -> PanopticPredictor:
        """Eager PyTorch (deploy mode, aux branches stripped) from a training checkpoint."""
        from sepsnet.engines.torch_backend import TorchBackend
        from sepsnet.export.bundle import default_classes
        from sepsnet.export.strip import build_deploy_model
        from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint

        ckpt = load_checkpoint(path)
        if config is not None:
            check_compatible(ckpt, config, path)
        cfg = config or checkpoint_config(ckpt, path)
        model, _ = build_deploy_model(cfg, ckpt["model"], str(path))
        device = resolve_device(device)
        classes = ckpt.get("meta") or default_classes(cfg.model.num_thing_classes, cfg.model.num_stuff_classes)
        return cls(TorchBackend(model, "dense", device), TorchBackend(model, "instance", device),
                   cfg.data, cfg.postprocess, classes)

    # -- inference ---------------------------------------------------------------------------
    def _target_sizes(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(resized, padded input) sizes for an h x w frame: the one inference resize policy
        (``sepsnet.data.transforms.inference_sizes``, shared with int8 calibration)."""
        return inference_sizes(h, w, self.data, self.input_hw)

    def _input_buffer(self, H: int, W: int, resized_hw: tuple[int, int], device: torch.device,
                      reuse: bool = True) -> torch.Tensor:
        """The calling thread's reused (1,3,H,W) input tensor, or a fresh one when ``reuse`` is False,
        with its padding (outside ``resized_hw``) zeroed: 0 is the mean colour. The frame area is
        left to the fill; a reused buffer whose padding is already zero for this size is not
        touched again (nothing but the fill writes to it)."""
        if not reuse:
            buf = torch.empty((1, 3, H, W), dtype=torch.float32, device=device)
            zero_padding(buf, resized_hw)
            return buf
        local = self._local
        buf = getattr(local, "buffer", None)
        if buf is None or tuple(buf.shape[2:]) != (H, W) or buf.device != device:
            buf = local.buffer = torch.empty((1, 3, H, W), dtype=torch.float32, device=device)
            local.buffer_resized = None
        if local.buffer_resized != resized_hw:
            zero_padding(buf, resized_hw)
            local.buffer_resized = resized_hw
        return buf

    def _fill_with_opencv(self, frame: np.ndarray, bgr: bool, rh: int, rw: int, buf: torch.Tensor) -> None:
        write_input(frame, self.data, (rh, rw), buf[0], bgr=bgr)

    def _fill_with_torch(self, frame: np.ndarray, bgr: bool, rh: int, rw: int, buf: torch.Tensor) -> None:
        """Device path: upload the uint8 frame (a quarter of the float bytes; pinned staging on CUDA),
        then channel order, bilinear resize (half-pixel, no antialias = OpenCV INTER_LINEAR) and
        normalisation on the device."""
        device = buf.device
        local = self._local
        staging = getattr(local, "staging", None)
        if staging is None or staging.shape != frame.shape or local.mean.device != device:
            staging = local.staging = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
            local.mean = torch.tensor(self.data.pixel_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            local.std = torch.tensor(self.data.pixel_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        staging.numpy()[...] = frame
        img = staging.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
        if bgr != (self.data.input_format == "BGR"):  # to the channel order the network expects
            img = img.flip(1)
        if (rh, rw) != tuple(frame.shape[:2]):
            img = torch.nn.functional.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False)
        buf[:, :, :rh, :rw] = (img - local.mean) / local.std

    def preprocess(self, frame: np.ndarray, bgr: bool = False, reuse: bool = True) -> tuple[torch.Tensor, tuple]:
        """Validated frame -> (1,3,H,W) input (the calling thread's reused buffer, or a fresh tensor
        when ``reuse`` is False) and ((resized), (original)) sizes. With a CUDA dense backend the
        frame is resized and normalised on the GPU (``preprocess_on = "device"``), else with OpenCV
        straight into the buffer (``write_input``). The reused buffer is read-only to callers: its
        zero padding is written only when the resized size changes."""
        frame = validate_frame(frame)
        h, w = frame.shape[:2]
        (rh, rw), (H, W) = self._target_sizes(h, w)
        on_device = self.preprocess_on == "device"
        device = self.dense.device if on_device else torch.device("cpu")
        buf = self._input_buffer(H, W, (rh, rw), device, reuse)
        if on_device:
            self._fill_with_torch(frame, bgr, rh, rw, buf)
        else:
            self._fill_with_opencv(frame, bgr, rh, rw, buf)
        return buf, ((rh, rw), (h, w))

    def prepare(self, frame: np.ndarray, bgr: bool = False) -> PreparedFrame:
        """Preprocess into a tensor the caller owns, ready for :meth:`infer` on another thread.
        On a GPU the upload finishes before returning (the pinned staging buffer is reused)."""
        t0 = time.perf_counter()
        image, sizes = self.preprocess(frame, bgr, reuse=False)
        if image.device.type == "cuda":
            torch.cuda.current_stream(image.device).synchronize()
        return PreparedFrame(image, sizes, time.perf_counter() - t0)

    def _run_instances(self, bases: torch.Tensor, p3: torch.Tensor, rois: torch.Tensor,
                       attention: torch.Tensor) -> dict[str, torch.Tensor]:
        """The instance engine on the candidates' rows. On the CPU, rows that repeat an earlier one
        bit for bit (the same location kept for two classes: the same box and attention) are run
        once and their outputs copied (:func:`distinct_rows`)."""
        rois = rois.float()
        on_cpu = rois.device.type == "cpu" and attention.device.type == "cpu"
        rows = distinct_rows(rois, attention) if on_cpu else None
        if rows is not None:  # NumPy indexing: see distinct_rows
            keep, inverse = rows
            rois, attention = (torch.from_numpy(t.detach().numpy()[keep]) for t in (rois, attention))
        with self._instance_lock:
            out = self.instance.run({"bases": bases, "p3": p3, "rois": rois, "attention": attention})
        if rows is not None:
            out = {k: torch.from_numpy(v.detach().cpu().numpy()[inverse]) for k, v in out.items()}
        return {k: v.to(rois.device) for k, v in out.items()}

    def __call__(self, frame: np.ndarray, bgr: bool = False) -> PanopticResult:
        """One frame (HxWx3 RGB uint8; ``bgr=True`` for OpenCV frames) -> PanopticResult. ``timings``
        (seconds): ``total`` always (host time of the call: on CUDA the id map may still be in
        flight); with ``timing`` on also every stage of ``FRAME_STAGES`` (preprocess, dense,
        candidates, instances, scoring, paste, dedup, stuff, fusion)."""
        t0 = time.perf_counter()
        image, sizes = self.preprocess(frame, bgr)
        return self.infer(PreparedFrame(image, sizes, time.perf_counter() - t0))

    def infer(self, prepared: PreparedFrame) -> PanopticResult:
        """Engines and post-processing on a frame from :meth:`prepare` (or :meth:`preprocess`):
        :meth:`run_dense` then :meth:`finish`."""
        return self.finish(prepared, *self.run_dense(prepared))

    def run_dense(self, prepared: PreparedFrame) -> tuple[dict[str, torch.Tensor], float]:
        """The dense engine on a prepared frame: (its outputs, seconds). A streaming loop runs this
        for frame n+1 while :meth:`finish` post-processes frame n. The device is synchronised only
        with ``timing`` on (then the seconds are the engine's, not its queueing time)."""
        with self._dense_lock:
            t1 = time.perf_counter()
            dense = self.dense.run({"image": prepared.image})
            if self.timing and self.dense.device.type == "cuda":
                torch.cuda.synchronize(self.dense.device)
        return dense, time.perf_counter() - t1

    def finish(self, prepared: PreparedFrame, dense: dict[str, torch.Tensor], dense_seconds: float = 0.0
               ) -> PanopticResult:
        """Candidates, instance engine and panoptic fusion on the dense outputs of ``prepared``."""
        t2 = time.perf_counter()
        timer = StageTimer(self.timing, self.dense.device)
        timer.start()
        with intra_op_threads(self.postprocess_threads):
            result = panoptic_inference(dense, self._run_instances, [prepared.sizes], self.postprocess,
                                        num_stuff_classes=self.num_stuff, return_masks=self.return_masks,
                                        preselect=self.preselect, timer=timer,
                                        panoptic_only=self.panoptic_only, device_path=self.device_path)[0]
        total = prepared.seconds + dense_seconds + time.perf_counter() - t2
        if self.timing:
            result.timings = {**timer.snapshot(), **result.timings, "preprocess": prepared.seconds,
                              "dense": dense_seconds}
        else:
            result.timings = {}
        result.timings["total"] = total
        return result

    predict = __call__


def distinct_rows(rois: torch.Tensor, attention: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(indices of the first of each distinct (roi, attention) row, index of each row's distinct row)
    for CPU tensors, or None when no row repeats. Rows are equal when their bytes are (exact). NumPy
    and a dict of the rows' bytes, no torch op: ``torch.unique(dim=0)`` sorts 800-wide rows ~500x
    slower, and on a busy CPU any torch op that starts OpenMP threads waits for them (~20 ms)."""
    if rois.shape[0] < 2:
        return None
    boxes, attn = rois.detach().numpy(), attention.detach().numpy()
    by_box: dict[bytes, list[int]] = {}  # a box's bytes -> its distinct rows (indices into keep)
    keep: list[int] = []
    inverse: list[int] = []
    for i in range(len(boxes)):
        same_box = by_box.setdefault(boxes[i].tobytes(), [])
        j = next((j for j in same_box if attn[keep[j]].tobytes() == attn[i].tobytes()), None)
        if j is None:
            j = len(keep)
            same_box.append(j)
            keep.append(i)
        inverse.append(j)
    if len(keep) == len(inverse):
        return None
    return np.asarray(keep, dtype=np.int64), np.asarray(inverse, dtype=np.int64)


def _auto_backend(bundle_has_plans: bool, device: torch.device) -> tuple[str, str]:
    """``backend="auto"``: TensorRT, then ONNX Runtime (CUDA or CPU, chosen by the ORT backend);
    returns the backend and the reason, for ``backend_choice``."""
    if device.type != "cuda":
        return "ort", "auto: no CUDA GPU asked or visible"
    if not bundle_has_plans:
        return "ort", "auto: the bundle has no TensorRT plans"
    if not _trt_version():
        return "ort", "auto: tensorrt cannot be imported"
    return "trt", "auto: TensorRT plans, TensorRT and a GPU"


def _trt_version() -> str | None:
    from sepsnet.engines.trt_backend import tensorrt_version

    return tensorrt_version()
