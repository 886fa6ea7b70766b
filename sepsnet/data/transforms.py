"""Paper transforms (Sec. IV-A): random horizontal flip, shorter edge resized into a range
(capped by a maximum longer edge), normalisation, and zero padding to a multiple of 32 in the
batch collate (docs/INTERFACES.md "Images into the network").

The runtime predictor reuses :func:`resize_shape`, :func:`normalize`, :func:`pad_to` and
:func:`preprocess_image`, so inference preprocessing equals training/evaluation; the inverse
mapping back to the original image is :func:`boxes_to_original` / :func:`map_to_original`.

ONE resize policy for every network input at inference time: :func:`inference_sizes` (resized and
padded sizes) and :func:`write_input` / :func:`prepare_input` (resize + normalise + zero padding).
``PanopticPredictor`` and int8 calibration (``sepsnet.export.calibration``) both call them, so the
calibration frames are exactly the tensors the engine will see.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from sepsnet.config import DataConfig
from sepsnet.errors import DataError


def resize_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter edge = ``short`` unless the longer edge would exceed ``max_size``;
    ``short <= 0`` keeps the original size."""
    if short <= 0:
        return h, w
    scale = short / min(h, w)
    if max_size > 0 and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def short_edge_range(cfg: DataConfig) -> tuple[int, int]:
    """``cfg.min_size_train`` as an inclusive [lo, hi] range (one value = fixed size)."""
    sizes = [int(s) for s in cfg.min_size_train]
    if not sizes or len(sizes) > 2 or sizes[0] > sizes[-1]:
        raise DataError(f"data.min_size_train must be [lo, hi] with lo <= hi, got {cfg.min_size_train}")
    return sizes[0], sizes[-1]


def pick_short_edge(cfg: DataConfig, train: bool) -> int:
    """Training: uniform integer in ``min_size_train`` (python ``random``, seeded per item by
    the trainer); evaluation: ``min_size_test``."""
    if not train:
        return cfg.min_size_test
    lo, hi = short_edge_range(cfg)
    return random.randint(lo, hi)


def target_size(h: int, w: int, cfg: DataConfig, train: bool, short: int | None = None) -> tuple[int, int]:
    """Resized (h, w) for an image of size (h, w) under ``cfg`` (``short`` overrides the draw)."""
    short = pick_short_edge(cfg, train) if short is None else short
    return resize_shape(h, w, short, cfg.max_size_train if train else cfg.max_size_test)


def normalize(image_rgb: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (3,H,W) float32 in ``cfg.input_format`` channel order, normalised with
    ``pixel_mean/std`` (given in that order, 0..255 scale)."""
    t = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float()
    if cfg.input_format == "BGR":
        t = t.flip(0)
    mean = torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std, dtype=torch.float32).view(3, 1, 1)
    return (t - mean) / std


def resize_image(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an HxWx3 image (no-op at the same size)."""
    h, w = out_hw
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=cv2.INTER_LINEAR)


def resize_sample(image: np.ndarray, id_map: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear for the image, nearest for the panoptic id map."""
    h, w = out_hw
    if image.shape[:2] == (h, w):
        return image, id_map
    ids = cv2.resize(id_map.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    return resize_image(image, out_hw), ids.astype(np.int64)


def hflip_sample(image: np.ndarray, id_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and id map together; targets built afterwards (masks, boxes and
    the stuff target) are therefore flipped consistently."""
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(id_map[:, ::-1])


def check_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an HxWx3 uint8 array (DataError otherwise)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DataError(f"{what}: expected an HxWx3 uint8 RGB array, got {desc}")
    if min(image.shape[:2]) < 1:
        raise DataError(f"{what}: empty image {image.shape}")
    return image


def preprocess_image(image_rgb: np.ndarray, cfg: DataConfig, train: bool = False,
                     short: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB -> (normalised (3,h,w) float32 tensor, resized (h, w)); unpadded, the
    collate / predictor pads. Evaluation size by default (``min_size_test``/``max_size_test``)."""
    check_rgb(image_rgb)
    rh, rw = target_size(image_rgb.shape[0], image_rgb.shape[1], cfg, train, short)
    return normalize(resize_image(image_rgb, (rh, rw)), cfg), (rh, rw)


def boxes_to_original(boxes: torch.Tensor, resized_hw: Sequence[int], original_hw: Sequence[int],
                      flipped: bool = False) -> torch.Tensor:
    """Inverse mapping of xyxy boxes in network-input pixels (resized, padding irrelevant) to
    the original image; undoes a horizontal flip first when ``flipped``."""
    rh, rw = int(resized_hw[0]), int(resized_hw[1])
    oh, ow = int(original_hw[0]), int(original_hw[1])
    b = boxes.clone().float()
    if flipped:
        b[..., [0, 2]] = rw - boxes[..., [2, 0]].float()
    b[..., 0::2] *= ow / rw
    b[..., 1::2] *= oh / rh
    b[..., 0::2] = b[..., 0::2].clamp(0, ow)
    b[..., 1::2] = b[..., 1::2].clamp(0, oh)
    return b


def map_to_original(label_map: np.ndarray, resized_hw: Sequence[int], original_hw: Sequence[int]) -> np.ndarray:
    """Inverse mapping of a per-pixel label map at the (possibly padded) input size: crop the
    padding to ``resized_hw`` then nearest-resize to ``original_hw``."""
    rh, rw = int(resized_hw[0]), int(resized_hw[1])
    crop = np.ascontiguousarray(label_map[:rh, :rw])
    oh, ow = int(original_hw[0]), int(original_hw[1])
    if (rh, rw) == (oh, ow):
        return crop
    dtype = crop.dtype
    work = np.uint8 if dtype in (np.uint8, np.bool_) else np.int32
    out = cv2.resize(crop.astype(work), (ow, oh), interpolation=cv2.INTER_NEAREST)
    return out.astype(dtype)


def pad_to(size: int, divisor: int) -> int:
    """Smallest multiple of ``divisor`` >= ``size``."""
    return int(-(-int(size) // divisor) * divisor) if divisor > 1 else int(size)


def inference_sizes(h: int, w: int, cfg: DataConfig,
                    input_hw: tuple[int, int] | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded input) sizes of an h x w frame at inference: the evaluation resize (shorter
    edge ``min_size_test``, longer edge capped by ``max_size_test``), then

    - dynamic input (``input_hw`` None): zero padding to a multiple of ``size_divisibility``, as the
      evaluation collate does;
    - static input ``input_hw = (H, W)``: shrunk (aspect kept) when it does not fit, then zero padding
      to exactly H x W. A frame is never enlarged to fill the static size, so a static engine sees the
      same image content as evaluation, only with a wider zero border (README "Static engine shape")."""
    rh, rw = resize_shape(h, w, cfg.min_size_test, cfg.max_size_test)
    if input_hw is None:
        return (rh, rw), (pad_to(rh, cfg.size_divisibility), pad_to(rw, cfg.size_divisibility))
    H, W = int(input_hw[0]), int(input_hw[1])
    if rh > H or rw > W:
        s = min(H / rh, W / rw)
        rh, rw = max(1, min(H, int(rh * s))), max(1, min(W, int(rw * s)))
    return (rh, rw), (H, W)


def write_input(frame: np.ndarray, cfg: DataConfig, resized_hw: tuple[int, int], out: torch.Tensor,
                bgr: bool = False) -> None:
    """Resize (OpenCV bilinear, as the datasets do) and normalise an HxWx3 uint8 frame (RGB, or BGR
    with ``bgr``) into the top-left ``resized_hw`` corner of ``out`` (3, H, W) float32; the rest of
    ``out`` is left as it is (the caller zeroes it: 0 is the mean colour after normalisation).

    Bit-identical to :func:`normalize` of :func:`resize_image` (the evaluation input): the same
    float32 ``(x - mean) / std`` per element, written channel by channel straight into ``out``
    (no float intermediate of the frame, no channel flip copy: the resize works per channel, so a
    BGR frame is resized as it is and its channels are read in the network's order)."""
    rh, rw = resized_hw
    img = resize_image(frame, (rh, rw))
    if out.device.type != "cpu":
        rgb = img[..., ::-1] if bgr else img
        out[:, :rh, :rw] = normalize(rgb, cfg).to(out.device)
        return
    dst = out.numpy()
    # network channel c reads frame channel order[c]: RGB/BGR frame into an RGB/BGR network
    flip = bgr != (cfg.input_format == "BGR")
    order = (2, 1, 0) if flip else (0, 1, 2)
    mean = np.asarray(cfg.pixel_mean, dtype=np.float32)
    std = np.asarray(cfg.pixel_std, dtype=np.float32)
    for c in range(3):
        plane = dst[c, :rh, :rw]
        np.subtract(img[:, :, order[c]], mean[c], out=plane, dtype=np.float32)
        np.divide(plane, std[c], out=plane)


def zero_padding(out: torch.Tensor, resized_hw: tuple[int, int]) -> None:
    """Zero ``out`` (..., H, W) outside its top-left ``resized_hw`` corner (the padding)."""
    rh, rw = resized_hw
    out[..., rh:, :] = 0
    out[..., :rh, rw:] = 0


def prepare_input(frame_rgb: np.ndarray, cfg: DataConfig,
                  input_hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """HxWx3 uint8 RGB frame -> ((1, 3, H, W) float32 network input, resized (h, w)) under the
    inference resize policy (:func:`inference_sizes` + :func:`write_input`)."""
    check_rgb(frame_rgb, "frame")
    (rh, rw), (H, W) = inference_sizes(frame_rgb.shape[0], frame_rgb.shape[1], cfg, input_hw)
    buf = torch.empty((1, 3, H, W), dtype=torch.float32)
    zero_padding(buf, (rh, rw))
    write_input(frame_rgb, cfg, (rh, rw), buf[0])
    return buf, (rh, rw)


def collate(batch: Sequence[dict[str, Any]],
            size_divisibility: int = 32) -> tuple[torch.Tensor, list[dict], list[dict]]:
    """Stack images zero-padded bottom/right to a multiple of ``size_divisibility``;
    masks padded with 0 and the stuff target with 255 (ignore). Returns (images, targets, infos);
    each info gets ``padded_size`` (H, W)."""
    if not batch:
        raise DataError("collate: empty batch")
    hmax = pad_to(max(b["image"].shape[1] for b in batch), size_divisibility)
    wmax = pad_to(max(b["image"].shape[2] for b in batch), size_divisibility)
    images = batch[0]["image"].new_zeros((len(batch), 3, hmax, wmax))
    targets, infos = [], []
    for i, b in enumerate(batch):
        _, h, w = b["image"].shape
        images[i, :, :h, :w] = b["image"]
        t = dict(b["targets"])
        masks = t["masks"].new_zeros((t["masks"].shape[0], hmax, wmax))
        masks[:, :h, :w] = t["masks"]
        stuff = t["stuff"].new_full((hmax, wmax), 255)
        stuff[:h, :w] = t["stuff"]
        t["masks"], t["stuff"] = masks, stuff
        targets.append(t)
        infos.append({**b["info"], "padded_size": (hmax, wmax)})
    return images, targets, infos


class Collate:
    """Picklable collate for DataLoader workers."""

    def __init__(self, size_divisibility: int = 32) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, batch: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[dict], list[dict]]:
        return collate(batch, self.size_divisibility)
