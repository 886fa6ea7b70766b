"""Synthetic panoptic scenes written as a COCO panoptic dataset (deterministic by seed).

Each image: a textured background split into stuff regions (sky / ground / wall) and 1-6
overlapping thing instances (disc, box, thin "L" shape) with occlusion and thin parts.
Training and evaluation then use the real COCO loader and the real evaluator.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sepsnet.errors import DataError
from sepsnet.fileio import atomic_write_bytes

MIN_SIZE = 32
CATEGORIES = [
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "box", "isthing": 1, "color": [0, 0, 142]},
    {"id": 3, "name": "ell", "isthing": 1, "color": [250, 170, 30]},
    {"id": 11, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 12, "name": "ground", "isthing": 0, "color": [152, 251, 152]},
    {"id": 13, "name": "wall", "isthing": 0, "color": [102, 102, 156]},
]
_BASE = {1: (200, 60, 60), 2: (60, 60, 200), 3: (230, 200, 40), 11: (140, 190, 235), 12: (90, 160, 70),
         13: (150, 140, 130)}


def _texture(rng: np.random.Generator, h: int, w: int, base: tuple[int, int, int], amp: float) -> np.ndarray:
    noise = cv2.resize(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32), (w, h))
    fine = rng.normal(0, 0.4, (h, w, 3)).astype(np.float32)
    return np.clip(np.array(base, np.float32) + amp * (noise + fine), 0, 255)


def _thing_mask(rng: np.random.Generator, kind: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    size = int(rng.integers(min(h, w) // 7, min(h, w) // 3))
    cx, cy = int(rng.integers(size // 2, w - size // 2)), int(rng.integers(h // 4, h - size // 2))
    if kind == 1:
        cv2.circle(mask, (cx, cy), size // 2, 1, -1)
    elif kind == 2:
        bw, bh = size, int(size * rng.uniform(0.5, 1.2))
        cv2.rectangle(mask, (cx - bw // 2, cy - bh // 2), (cx + bw // 2, cy + bh // 2), 1, -1)
    else:  # thin "L": a vertical bar and a horizontal foot, 4-8 px thick
        t = int(rng.integers(4, 9))
        cv2.rectangle(mask, (cx - size // 2, cy - size // 2), (cx - size // 2 + t, cy + size // 2), 1, -1)
        cv2.rectangle(mask, (cx - size // 2, cy + size // 2 - t), (cx + size // 2, cy + size // 2), 1, -1)
    return mask.astype(bool)


def make_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """One image (HxWx3 uint8), its panoptic id map and segments_info."""
    cat_map = np.empty((h, w), np.int64)
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    cat_map[:horizon] = 11
    cat_map[horizon:] = 12
    if rng.random() < 0.6:  # a wall block standing on the ground
        x0, x1 = sorted(rng.integers(0, w, 2))
        if x1 - x0 > w // 6:
            cat_map[int(horizon * rng.uniform(0.3, 0.8)):horizon + 10, x0:x1] = 13
    image = np.zeros((h, w, 3), np.float32)
    for cat in (11, 12, 13):
        sel = cat_map == cat
        image[sel] = _texture(rng, h, w, _BASE[cat], 12.0)[sel]
    ids = np.zeros((h, w), np.int64)
    segments = []
    next_id = 1
    for cat in (11, 12, 13):
        area = int((cat_map == cat).sum())
        if area:
            ids[cat_map == cat] = next_id
            segments.append({"id": next_id, "category_id": cat})
            next_id += 1
    for _ in range(int(rng.integers(1, 7))):
        kind = int(rng.integers(1, 4))
        mask = _thing_mask(rng, kind, h, w)
        shade = np.array(_BASE[kind], np.float32) * rng.uniform(0.8, 1.15)
        image[mask] = _texture(rng, h, w, tuple(np.clip(shade, 0, 255)), 10.0)[mask]
        ids[mask] = next_id
        segments.append({"id": next_id, "category_id": kind})
        next_id += 1
    final = []
    for seg in segments:
        m = ids == seg["id"]
        area = int(m.sum())
        if area < 16:  # fully occluded or a sliver: merge into void
            ids[m] = 0
            continue
        ys, xs = np.nonzero(m)
        final.append({**seg, "iscrowd": 0, "area": area,
                      "bbox": [int(xs.min()), int(ys.min()),
                               int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
    return image.astype(np.uint8), ids, final


def _ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _write_atomic_image(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise DataError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes(), fsync=False)


def write_split(out: str | Path, split: str, n: int, seed: int, size: int = 256) -> Path:
    """Write ``n`` scenes as ``out/{split}/``, ``out/annotations/panoptic_{split}{.json,/}``."""
    if n < 0 or size < MIN_SIZE:
        raise DataError(f"synthetic split {split!r}: need n >= 0 and size >= {MIN_SIZE}, got n={n}, size={size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a folder: {out}")
    img_dir, png_dir = out / split, out / "annotations" / f"panoptic_{split}"
    img_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        h = size
        w = int(size * rng.choice([1.0, 1.25]))
        image, ids, segments = make_scene(rng, h, w)
        name = f"{split}_{i:06d}"
        _write_atomic_image(img_dir / f"{name}.png", image)
        _write_atomic_image(png_dir / f"{name}.png", _ids_to_rgb(ids))
        images.append({"id": i, "file_name": f"{name}.png", "height": h, "width": w})
        annotations.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segments})
    doc = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    json_path = out / "annotations" / f"panoptic_{split}.json"
    atomic_write_bytes(json_path, json.dumps(doc).encode())
    return json_path


def generate(out: str | Path, n_train: int, n_val: int, seed: int = 0, size: int = 256) -> None:
    """Train split (``seed``) and, when ``n_val > 0``, val split (``seed + 1e6``) under ``out``;
    ``CocoPanopticDataset.from_root(out, "train" | "val", ...)`` reads them."""
    write_split(out, "train", n_train, seed, size)
    if n_val:
        write_split(out, "val", n_val, seed + 1_000_000, size)
