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
from typing import Any, Union

import numpy as np
import torch

from sepsnet.config import DataConfig, PostprocessConfig, SEPSNetConfig, config_from_dict
from sepsnet.data.transforms import inference_sizes, write_input
from sepsnet.engines.backend import Backend
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.preselect import Preselect, check_preselect
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.timing import StageTimer

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
        self.dense, self.instance = dense, instance
        self.data, self.postprocess = data, postprocess
        self.classes = classes
        self.num_stuff = len(classes["stuff"])
        self.input_hw = input_hw
        self._buffer: torch.Tensor | None = None
        self._staging: torch.Tensor | None = None
        self._lock = threading.Lock()
        device = getattr(dense, "device", torch.device("cpu"))
        self.preprocess_on = "device" if torch.device(device).type == "cuda" else "opencv"

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: PathLike, backend: str = "auto", threads: int | None = None,
                    cuda_graph: bool = False, graphs: dict[str, str] | None = None) -> PanopticPredictor:
        """``backend``: ``auto`` (TensorRT when the bundle has plans and TensorRT + GPU exist, else
        ONNX Runtime), ``ort`` or ``trt``. ``path``: bundle folder, manifest or a file inside it.
        ``cuda_graph``: TensorRT only, capture the static-shape dense engine in a CUDA graph.
        ``graphs``: ONNX Runtime only, ``{"dense": file, "instance": file}`` of the bundle to run
        instead of the fp32 ``onnx`` graphs (e.g. the fp16 / int8 engine graphs, to measure their
        accuracy: ``sepsnet.eval.bundle_eval``)."""
        from sepsnet.export.bundle import has_plans, verify_bundle

        root = Path(path)
        root = root.parent if root.is_file() else root
        manifest = verify_bundle(root)
        if backend == "auto":
            backend = "trt" if has_plans(manifest) and torch.cuda.is_available() and _trt_version() else "ort"
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
            runtime = current_runtime()  # TensorRT here + the compute capability of the device that will run
            check_plan_compatible(manifest, runtime, str(root))
            plugin = root / manifest["plugin"] if manifest.get("plugin") else None
            vc = bool(manifest["engine"]["version_compatible"])
            dense: Backend = TrtBackend(root / graphs["dense"]["plan"], plugin, device=runtime.device,
                                        cuda_graph=cuda_graph, version_compatible=vc)
            instance: Backend = TrtBackend(root / graphs["instance"]["plan"], plugin, device=runtime.device,
                                           version_compatible=vc)
        elif backend == "ort":
            from sepsnet.engines.ort_backend import OrtBackend

            chosen = graphs_override or {k: graphs[k]["onnx"] for k in ("dense", "instance")}
            dense = OrtBackend(root / chosen["dense"], threads=threads)
            instance = OrtBackend(root / chosen["instance"], threads=threads)
        else:
            raise EngineError(f"unknown backend {backend!r} (auto, ort, trt)")
        cfg = config_from_dict(manifest["config"], where=f"{root}/manifest.json")
        post = PostprocessConfig(**manifest.get("postprocess", {}))
        inp = manifest["input"]
        input_hw = None if inp.get("dynamic") else (int(inp["height"]), int(inp["width"]))
        return cls(dense, instance, cfg.data, post, manifest["classes"], input_hw, manifest.get("preselect"))

    @classmethod
    def from_checkpoint(cls, path: PathLike, config: SEPSNetConfig | None = None,
                        device: str | None = None) -> PanopticPredictor:
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
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        classes = ckpt.get("meta") or default_classes(cfg.model.num_thing_classes, cfg.model.num_stuff_classes)
        return cls(TorchBackend(model, "dense", device), TorchBackend(model, "instance", device),
                   cfg.data, cfg.postprocess, classes)

    # -- inference ---------------------------------------------------------------------------
    def _target_sizes(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(resized, padded input) sizes for an h x w frame: the one inference resize policy
        (``sepsnet.data.transforms.inference_sizes``, shared with int8 calibration)."""
        return inference_sizes(h, w, self.data, self.input_hw)

    def _input_buffer(self, H: int, W: int, device: torch.device) -> torch.Tensor:
        """The reused (1,3,H,W) input tensor, zeroed (padding must be 0 = the mean colour)."""
        if self._buffer is None or tuple(self._buffer.shape[2:]) != (H, W) or self._buffer.device != device:
            self._buffer = torch.zeros((1, 3, H, W), dtype=torch.float32, device=device)
        else:
            self._buffer.zero_()
        return self._buffer

    def _fill_with_opencv(self, frame: np.ndarray, bgr: bool, rh: int, rw: int, buf: torch.Tensor) -> None:
        write_input(frame[..., ::-1] if bgr else frame, self.data, (rh, rw), buf[0])

    def _fill_with_torch(self, frame: np.ndarray, bgr: bool, rh: int, rw: int, buf: torch.Tensor) -> None:
        """Device path: upload the uint8 frame (a quarter of the float bytes; pinned staging on CUDA),
        then channel order, bilinear resize (half-pixel, no antialias = OpenCV INTER_LINEAR) and
        normalisation on the device."""
        device = buf.device
        if self._staging is None or self._staging.shape != frame.shape:
            self._staging = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
            self._mean = torch.tensor(self.data.pixel_mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._std = torch.tensor(self.data.pixel_std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._staging.numpy()[...] = frame
        img = self._staging.to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
        if bgr != (self.data.input_format == "BGR"):  # to the channel order the network expects
            img = img.flip(1)
        if (rh, rw) != tuple(frame.shape[:2]):
            img = torch.nn.functional.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False)
        buf[:, :, :rh, :rw] = (img - self._mean) / self._std

    def preprocess(self, frame: np.ndarray, bgr: bool = False) -> tuple[torch.Tensor, tuple]:
        """Validated frame -> reused (1,3,H,W) input buffer and ((resized), (original)) sizes.
        With a CUDA dense backend the frame is resized and normalised on the GPU
        (``preprocess_on = "device"``), else with OpenCV on the CPU."""
        frame = validate_frame(frame)
        h, w = frame.shape[:2]
        (rh, rw), (H, W) = self._target_sizes(h, w)
        on_device = self.preprocess_on == "device"
        device = self.dense.device if on_device else torch.device("cpu")
        buf = self._input_buffer(H, W, device)
        if on_device:
            self._fill_with_torch(frame, bgr, rh, rw, buf)
        else:
            self._fill_with_opencv(frame, bgr, rh, rw, buf)
        return buf, ((rh, rw), (h, w))

    def _run_instances(self, bases: torch.Tensor, p3: torch.Tensor, rois: torch.Tensor,
                       attention: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.instance.run({"bases": bases, "p3": p3, "rois": rois.float(), "attention": attention})
        return {k: v.to(rois.device) for k, v in out.items()}

    def __call__(self, frame: np.ndarray, bgr: bool = False) -> PanopticResult:
        """One frame (HxWx3 RGB uint8; ``bgr=True`` for OpenCV frames) -> PanopticResult. ``timings``
        (seconds): ``total`` always (host time of the call: on CUDA the id map may still be in
        flight); with ``timing`` on also every stage of ``FRAME_STAGES`` (preprocess, dense,
        candidates, instances, scoring, paste, dedup, stuff, fusion)."""
        with self._lock:
            t0 = time.perf_counter()
            timer = StageTimer(self.timing, self.dense.device)
            timer.start()
            with timer.stage("preprocess"):
                image, sizes = self.preprocess(frame, bgr)
            with timer.stage("dense"):
                dense = self.dense.run({"image": image})
            result = panoptic_inference(dense, self._run_instances, [sizes], self.postprocess,
                                        num_stuff_classes=self.num_stuff, return_masks=self.return_masks,
                                        preselect=self.preselect, timer=timer)[0]
            result.timings = {**timer.snapshot(), **result.timings} if self.timing else {}
            result.timings["total"] = time.perf_counter() - t0
        return result

    predict = __call__


def _trt_version() -> str | None:
    from sepsnet.engines.trt_backend import tensorrt_version

    return tensorrt_version()
