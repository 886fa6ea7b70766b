"""``PanopticPredictor``: frame in, panoptic result out, for a camera loop.

Preprocess exactly as evaluation (shorter edge to ``min_size_test`` capped by ``max_size_test``,
fitted into a static bundle's input size), dense engine, the shared post-processing
(``sepsnet.postprocess.pipeline``) with the instance engine, results at the frame's resolution.
The input buffer is reused between frames; one lock per predictor makes it thread-safe; a bad
frame raises :class:`FrameError` and leaves the predictor ready for the next one.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np
import torch

from sepsnet.config import DataConfig, PostprocessConfig, SEPSNetConfig, config_from_dict
from sepsnet.data.transforms import normalize, pad_to, resize_shape
from sepsnet.engines.backend import Backend
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.results import PanopticResult

PathLike = Union[str, Path]


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
                 classes: dict[str, Any], input_hw: Optional[tuple[int, int]] = None) -> None:
        self.dense, self.instance = dense, instance
        self.data, self.postprocess = data, postprocess
        self.classes = classes
        self.num_stuff = len(classes["stuff"])
        self.input_hw = input_hw
        self._buffer: Optional[torch.Tensor] = None
        self._lock = threading.Lock()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: PathLike, backend: str = "auto", threads: Optional[int] = None,
                    cuda_graph: bool = False) -> "PanopticPredictor":
        """``backend``: ``auto`` (TensorRT when the bundle has plans and TensorRT + GPU exist, else
        ONNX Runtime), ``ort`` or ``trt``. ``path``: bundle folder, manifest or a file inside it.
        ``cuda_graph``: TensorRT only, capture the static-shape dense engine in a CUDA graph."""
        from sepsnet.export.bundle import has_plans, verify_bundle

        root = Path(path)
        root = root.parent if root.is_file() else root
        manifest = verify_bundle(root)
        if backend == "auto":
            backend = "trt" if has_plans(manifest) and torch.cuda.is_available() and _trt_version() else "ort"
        graphs = manifest["graphs"]
        if backend == "trt":
            from sepsnet.engines.trt_backend import TrtBackend
            from sepsnet.export.bundle import check_trt_compatible

            if not has_plans(manifest):
                raise BundleError(f"{root} has no TensorRT plans; build them with `sepsnet-export --from-onnx {root}`")
            check_trt_compatible(manifest, _trt_version(), torch.cuda.get_device_name(0)
                                 if torch.cuda.is_available() else None, str(root))
            plugin = root / manifest["plugin"] if manifest.get("plugin") else None
            dense: Backend = TrtBackend(root / graphs["dense"]["plan"], plugin, cuda_graph=cuda_graph)
            instance: Backend = TrtBackend(root / graphs["instance"]["plan"], plugin)
        elif backend == "ort":
            from sepsnet.engines.ort_backend import OrtBackend

            dense = OrtBackend(root / graphs["dense"]["onnx"], threads=threads)
            instance = OrtBackend(root / graphs["instance"]["onnx"], threads=threads)
        else:
            raise EngineError(f"unknown backend {backend!r} (auto, ort, trt)")
        cfg = config_from_dict(manifest["config"], where=f"{root}/manifest.json")
        post = PostprocessConfig(**manifest.get("postprocess", {}))
        inp = manifest["input"]
        input_hw = None if inp.get("dynamic") else (int(inp["height"]), int(inp["width"]))
        return cls(dense, instance, cfg.data, post, manifest["classes"], input_hw)

    @classmethod
    def from_checkpoint(cls, path: PathLike, config: Optional[SEPSNetConfig] = None,
                        device: Optional[str] = None) -> "PanopticPredictor":
        """Eager PyTorch (deploy mode, aux branches stripped) from a training checkpoint."""
        from sepsnet.engines.torch_backend import TorchBackend
        from sepsnet.export.bundle import default_classes
        from sepsnet.export.strip import build_deploy_model
        from sepsnet.train.checkpoint import check_compatible, checkpoint_config, load_checkpoint

        ckpt = load_checkpoint(path)
        if config is not None:
            check_compatible(ckpt, config, path)
        cfg = config or checkpoint_config(ckpt, path)
        model, _ = build_deploy_model(cfg, ckpt["model"], str(path))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        classes = ckpt.get("meta") or default_classes(cfg.model.num_thing_classes, cfg.model.num_stuff_classes)
        return cls(TorchBackend(model, "dense", device), TorchBackend(model, "instance", device),
                   cfg.data, cfg.postprocess, classes)

    # -- inference ---------------------------------------------------------------------------
    def preprocess(self, frame: np.ndarray, bgr: bool = False) -> tuple[torch.Tensor, tuple]:
        """Validated frame -> reused (1,3,H,W) input buffer and ((resized), (original)) sizes."""
        rgb = validate_frame(frame)
        if bgr:
            rgb = rgb[..., ::-1]
        h, w = rgb.shape[:2]
        rh, rw = resize_shape(h, w, self.data.min_size_test, self.data.max_size_test)
        if self.input_hw is not None:
            H, W = self.input_hw
            if rh > H or rw > W:  # fit into the static engine size, keeping the aspect ratio
                s = min(H / rh, W / rw)
                rh, rw = max(1, min(H, int(rh * s))), max(1, min(W, int(rw * s)))
        else:
            H, W = pad_to(rh, self.data.size_divisibility), pad_to(rw, self.data.size_divisibility)
        img = cv2.resize(np.ascontiguousarray(rgb), (rw, rh), interpolation=cv2.INTER_LINEAR) if (rh, rw) != (h, w) else rgb
        if self._buffer is None or tuple(self._buffer.shape[2:]) != (H, W):
            self._buffer = torch.zeros((1, 3, H, W), dtype=torch.float32)
        else:
            self._buffer.zero_()
        self._buffer[0, :, :rh, :rw] = normalize(img, self.data)
        return self._buffer, ((rh, rw), (h, w))

    def _run_instances(self, bases: torch.Tensor, p3: torch.Tensor, rois: torch.Tensor,
                       attention: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.instance.run({"bases": bases, "p3": p3, "rois": rois.float(), "attention": attention})
        return {k: v.to(rois.device) for k, v in out.items()}

    def __call__(self, frame: np.ndarray, bgr: bool = False) -> PanopticResult:
        """One frame (HxWx3 RGB uint8; ``bgr=True`` for OpenCV frames) -> PanopticResult with
        ``timings`` (seconds): preprocess, dense, nms, instance, postprocess, total."""
        with self._lock:
            t0 = time.perf_counter()
            image, sizes = self.preprocess(frame, bgr)
            t1 = time.perf_counter()
            dense = self.dense.run({"image": image})
            if self.dense.device.type == "cuda":  # stage timings, not queue times
                torch.cuda.synchronize(self.dense.device)
            t2 = time.perf_counter()
            result = panoptic_inference(dense, self._run_instances, [sizes], self.postprocess,
                                        num_stuff_classes=self.num_stuff)[0]
            t3 = time.perf_counter()
        pt = result.timings
        nms, inst = pt.get("candidates", 0.0), pt.get("instances", 0.0)
        result.timings = {"preprocess": t1 - t0, "dense": t2 - t1, "nms": nms, "instance": inst,
                          "postprocess": max(0.0, (t3 - t2) - nms - inst), "total": t3 - t0}
        return result

    predict = __call__


def _trt_version() -> Optional[str]:
    from sepsnet.engines.trt_backend import tensorrt_version

    return tensorrt_version()
