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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
import torch

from sepsnet.config import DataConfig, PostprocessConfig, SEPSNetConfig, config_from_dict
from sepsnet.data.transforms import normalize, pad_to, resize_shape
from sepsnet.engines.backend import Backend
from sepsnet.engines.device import resolve_device
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.postprocess.pipeline import check_preselect, panoptic_inference
from sepsnet.postprocess.results import PanopticResult

PathLike = Union[str, Path]
log = logging.getLogger("sepsnet")


@dataclass
class PreparedFrame:
    """A preprocessed frame owned by its caller (not a reused buffer): the (1,3,H,W) engine input,
    ((resized h, w), (original h, w)) and the seconds preprocessing took."""

    image: torch.Tensor
    sizes: tuple[tuple[int, int], tuple[int, int]]
    seconds: float = 0.0


def validate_frame(frame: Any) -> np.ndarray:
    """HxWx3 uint8 (or finite float 0..255) -> uint8 array; FrameError naming the problem."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array (HxWx3), got {type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise FrameError(f"frame must have shape HxWx3, got {frame.shape}")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise FrameError(f"frame is empty or too small: {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        if not np.isfinite(frame).all():
            raise FrameError("frame contains NaN or Inf values")
        return np.clip(frame, 0, 255).astype(np.uint8)
    raise FrameError(f"frame dtype must be uint8 (or float 0..255), got {frame.dtype}")


class PanopticPredictor:
    """Run a dense + instance backend pair with the shared post-processing."""

    def __init__(self, dense: Backend, instance: Backend, data: DataConfig, postprocess: PostprocessConfig,
                 classes: dict[str, Any], input_hw: tuple[int, int] | None = None,
                 preselect: dict[str, Any] | None = None) -> None:
        """``preselect``: the manifest's ``preselect`` when the dense engine keeps only the top-k
        locations per level (checked against ``postprocess`` here, not at the first frame)."""
        check_preselect(preselect, postprocess)
        self.preselect = preselect
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
                    cuda_graph: bool = False, device: str | int | torch.device = "auto") -> PanopticPredictor:
        """``backend``: ``auto`` picks TensorRT (the bundle has plans, TensorRT imports, a GPU is
        visible), then ONNX Runtime with CUDA (onnxruntime-gpu and a GPU), then ONNX Runtime on the
        CPU, and records why in ``backend_choice`` (also logged); or ``ort`` / ``trt``.
        ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or N: the GPU both engines run on.
        ``path``: bundle folder, manifest or a file inside it.
        ``cuda_graph``: TensorRT only, capture the static-shape dense engine in a CUDA graph."""
        from sepsnet.export.bundle import has_plans, verify_bundle

        root = Path(path)
        root = root.parent if root.is_file() else root
        manifest = verify_bundle(root)
        auto_device = isinstance(device, str) and device.strip().lower() == "auto"
        target = resolve_device(device)
        why = f"backend={backend!r}"
        if backend == "auto":
            backend, why = _auto_backend(has_plans(manifest), target)
        graphs = manifest["graphs"]
        if backend == "trt":
            from sepsnet.engines.trt_backend import TrtBackend
            from sepsnet.export.bundle import check_trt_compatible

            if not has_plans(manifest):
                raise BundleError(f"{root} has no TensorRT plans; build them with `sepsnet-export --from-onnx {root}`")
            if target.type != "cuda":
                raise EngineError(f"backend='trt' needs a CUDA GPU, but device={device!r} resolves to {target}")
            check_trt_compatible(manifest, _trt_version(), torch.cuda.get_device_name(target), str(root))
            plugin = root / manifest["plugin"] if manifest.get("plugin") else None
            index = int(target.index or 0)
            dense: Backend = TrtBackend(root / graphs["dense"]["plan"], plugin, device=index, cuda_graph=cuda_graph)
            instance: Backend = TrtBackend(root / graphs["instance"]["plan"], plugin, device=index)
        elif backend == "ort":
            from sepsnet.engines.ort_backend import OrtBackend

            ort_device: str | torch.device = "auto" if auto_device else target
            dense = OrtBackend(root / graphs["dense"]["onnx"], device=ort_device, threads=threads)
            instance = OrtBackend(root / graphs["instance"]["onnx"], device=ort_device, threads=threads)
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
        """(resized, padded input) sizes for an h x w frame, as evaluation computes them."""
        rh, rw = resize_shape(h, w, self.data.min_size_test, self.data.max_size_test)
        if self.input_hw is not None:
            H, W = self.input_hw
            if rh > H or rw > W:  # fit into the static engine size, keeping the aspect ratio
                s = min(H / rh, W / rw)
                rh, rw = max(1, min(H, int(rh * s))), max(1, min(W, int(rw * s)))
        else:
            H, W = pad_to(rh, self.data.size_divisibility), pad_to(rw, self.data.size_divisibility)
        return (rh, rw), (H, W)

    def _input_buffer(self, H: int, W: int, device: torch.device, reuse: bool = True) -> torch.Tensor:
        """The calling thread's reused (1,3,H,W) input tensor, zeroed (padding must be 0 = the mean
        colour); a fresh one when ``reuse`` is False."""
        if not reuse:
            return torch.zeros((1, 3, H, W), dtype=torch.float32, device=device)
        buf = getattr(self._local, "buffer", None)
        if buf is None or tuple(buf.shape[2:]) != (H, W) or buf.device != device:
            buf = self._local.buffer = torch.zeros((1, 3, H, W), dtype=torch.float32, device=device)
        else:
            buf.zero_()
        return buf

    def _fill_with_opencv(self, frame: np.ndarray, bgr: bool, rh: int, rw: int, buf: torch.Tensor) -> None:
        rgb = frame[..., ::-1] if bgr else frame
        h, w = frame.shape[:2]
        img = cv2.resize(np.ascontiguousarray(rgb), (rw, rh), interpolation=cv2.INTER_LINEAR) if (rh, rw) != (h, w) else rgb
        buf[0, :, :rh, :rw] = normalize(img, self.data)

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
        if bgr:
            img = img.flip(1)
        if (rh, rw) != tuple(frame.shape[:2]):
            img = torch.nn.functional.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False)
        buf[:, :, :rh, :rw] = (img - local.mean) / local.std

    def preprocess(self, frame: np.ndarray, bgr: bool = False, reuse: bool = True) -> tuple[torch.Tensor, tuple]:
        """Validated frame -> (1,3,H,W) input (the calling thread's reused buffer, or a fresh tensor
        when ``reuse`` is False) and ((resized), (original)) sizes. With a CUDA dense backend the
        frame is resized and normalised on the GPU (``preprocess_on = "device"``), else with OpenCV."""
        frame = validate_frame(frame)
        h, w = frame.shape[:2]
        (rh, rw), (H, W) = self._target_sizes(h, w)
        on_device = self.preprocess_on == "device"
        device = self.dense.device if on_device else torch.device("cpu")
        buf = self._input_buffer(H, W, device, reuse)
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
        with self._instance_lock:
            out = self.instance.run({"bases": bases, "p3": p3, "rois": rois.float(), "attention": attention})
        return {k: v.to(rois.device) for k, v in out.items()}

    def __call__(self, frame: np.ndarray, bgr: bool = False) -> PanopticResult:
        """One frame (HxWx3 RGB uint8; ``bgr=True`` for OpenCV frames) -> PanopticResult with
        ``timings`` (seconds): preprocess, dense, nms, instance, postprocess, total."""
        t0 = time.perf_counter()
        image, sizes = self.preprocess(frame, bgr)
        return self.infer(PreparedFrame(image, sizes, time.perf_counter() - t0))

    def infer(self, prepared: PreparedFrame) -> PanopticResult:
        """Engines and post-processing on a frame from :meth:`prepare` (or :meth:`preprocess`):
        :meth:`run_dense` then :meth:`finish`."""
        return self.finish(prepared, *self.run_dense(prepared))

    def run_dense(self, prepared: PreparedFrame) -> tuple[dict[str, torch.Tensor], float]:
        """The dense engine on a prepared frame: (its outputs, seconds). A streaming loop runs this
        for frame n+1 while :meth:`finish` post-processes frame n."""
        with self._dense_lock:
            t1 = time.perf_counter()
            dense = self.dense.run({"image": prepared.image})
            if self.dense.device.type == "cuda":  # stage timings, not queue times
                torch.cuda.synchronize(self.dense.device)
        return dense, time.perf_counter() - t1

    def finish(self, prepared: PreparedFrame, dense: dict[str, torch.Tensor], dense_seconds: float = 0.0
               ) -> PanopticResult:
        """Candidates, instance engine and panoptic fusion on the dense outputs of ``prepared``."""
        t2 = time.perf_counter()
        result = panoptic_inference(dense, self._run_instances, [prepared.sizes], self.postprocess,
                                    num_stuff_classes=self.num_stuff, preselect=self.preselect)[0]
        t3 = time.perf_counter()
        pt = result.timings
        nms, inst = pt.get("candidates", 0.0), pt.get("instances", 0.0)
        result.timings = {"preprocess": prepared.seconds, "dense": dense_seconds, "nms": nms, "instance": inst,
                          "postprocess": max(0.0, (t3 - t2) - nms - inst),
                          "total": prepared.seconds + dense_seconds + t3 - t2}
        return result

    predict = __call__


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
