"""Paper transforms (IV-A): random flip, shorter edge resized into a range, normalisation,
padding to a multiple of 32 in the batch collate. The runtime predictor reuses
:func:`resize_shape` and :func:`normalize` so inference preprocessing equals training."""
from __future__ import annotations

import random
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from sepsnet.config import DataConfig


def resize_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter edge = ``short`` unless the longer edge would exceed ``max_size``;
    ``short <= 0`` keeps the original size."""
    if short <= 0:
        return h, w
    scale = short / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def pick_short_edge(cfg: DataConfig, train: bool) -> int:
    if not train:
        return cfg.min_size_test
    lo, hi = (cfg.min_size_train * 2)[:2] if len(cfg.min_size_train) == 1 else cfg.min_size_train
    return random.randint(int(lo), int(hi))


def normalize(image_rgb: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (3,H,W) float32 normalised with ``pixel_mean/std`` (0..255 scale)."""
    t = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float()
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    return (t - mean) / std


def resize_sample(image: np.ndarray, id_map: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear for the image, nearest for the panoptic id map."""
    h, w = out_hw
    if image.shape[:2] == (h, w):
        return image, id_map
    img = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    ids = cv2.resize(id_map.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
    return img, ids


def pad_to(size: int, divisor: int) -> int:
    return int(np.ceil(size / divisor) * divisor) if divisor > 1 else size


def collate(batch: Sequence[dict[str, Any]], size_divisibility: int = 32) -> tuple[torch.Tensor, list[dict], list[dict]]:
    """Stack images zero-padded bottom/right to a multiple of ``size_divisibility``;
    masks padded with 0 and the stuff target with 255 (ignore)."""
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
        infos.append(b["info"])
    return images, targets, infos


class Collate:
    """Picklable collate for DataLoader workers."""

    def __init__(self, size_divisibility: int = 32) -> None:
        self.size_divisibility = size_divisibility

    def __call__(self, batch: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, list[dict], list[dict]]:
        return collate(batch, self.size_divisibility)
