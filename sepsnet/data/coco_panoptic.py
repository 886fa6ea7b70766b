"""COCO panoptic dataset: JSON + PNG folder (id = R + 256 G + 256^2 B) + image folder.

Standard layout (``from_root``): ``root/annotations/panoptic_{split}.json``,
``root/annotations/panoptic_{split}/*.png`` and ``root/{split}/*.jpg`` — the layout of COCO
and of ``sepsnet-synth``. Other layouts are given as explicit paths.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Union

import cv2
import numpy as np
from torch.utils.data import Dataset

from sepsnet.config import DataConfig
from sepsnet.data.metadata import ClassMetadata
from sepsnet.data.targets import build_targets
from sepsnet.data.transforms import normalize, pick_short_edge, resize_sample, resize_shape
from sepsnet.errors import DataError

log = logging.getLogger(__name__)
PathLike = Union[str, Path]


def read_rgb(path: PathLike) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB; DataError naming the file when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise DataError(f"cannot decode image (corrupt or unsupported format): {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """COCO panoptic PNG -> int64 id map (R + 256 G + 256^2 B)."""
    rgb = read_rgb(path).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def load_panoptic_json(path: PathLike, categories_path: Optional[PathLike] = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"malformed JSON in {path}: {exc}") from None
    if categories_path is not None:
        try:
            data["categories"] = json.loads(Path(categories_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read categories {categories_path}: {exc}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list (not a COCO panoptic file?)")
    return data


class CocoPanopticDataset(Dataset):
    """Items: ``image`` (3,h,w) normalised, ``targets`` (INTERFACES.md), ``info``."""

    def __init__(self, json_path: PathLike, png_dir: PathLike, image_dir: PathLike, cfg: DataConfig,
                 train: bool, categories_path: Optional[PathLike] = None, skip_bad: Optional[bool] = None) -> None:
        self.json_path, self.png_dir, self.image_dir = Path(json_path), Path(png_dir), Path(image_dir)
        for folder in (self.png_dir, self.image_dir):
            if not folder.is_dir():
                raise DataError(f"dataset folder not found: {folder}")
        data = load_panoptic_json(json_path, categories_path)
        self.meta = ClassMetadata.from_coco_categories(data["categories"])
        images = {img["id"]: img for img in data["images"]}
        self.records = []
        for ann in data["annotations"]:
            img = images.get(ann["image_id"])
            if img is None:
                raise DataError(f"{json_path}: annotation for unknown image id {ann['image_id']}")
            self.records.append({"image": img, "ann": ann})
        self.cfg = cfg
        self.train = train
        self.skip_bad = cfg.skip_bad if skip_bad is None else skip_bad

    @classmethod
    def from_root(cls, root: PathLike, split: str, cfg: DataConfig, train: bool) -> "CocoPanopticDataset":
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        ann = root / "annotations"
        return cls(ann / f"panoptic_{split}.json", ann / f"panoptic_{split}", root / split, cfg, train)

    def __len__(self) -> int:
        return len(self.records)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rec = self.records[index]
        image = read_rgb(self.image_dir / rec["image"]["file_name"])
        id_map = read_panoptic_png(self.png_dir / rec["ann"]["file_name"])
        if image.shape[:2] != id_map.shape:
            raise DataError(f"image {rec['image']['file_name']} is {image.shape[:2]} but its panoptic PNG "
                            f"{rec['ann']['file_name']} is {id_map.shape}")
        return image, id_map, rec

    def load_gt(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Ground truth at the original resolution: id map + COCO ``segments_info``."""
        rec = self.records[index]
        return read_panoptic_png(self.png_dir / rec["ann"]["file_name"]), rec["ann"]["segments_info"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image, id_map, rec = self.load_raw(index)
        except DataError as exc:
            if not self.skip_bad:
                raise
            log.warning("skipping bad sample: %s", exc)
            return self[(index + 1) % len(self)]
        h, w = image.shape[:2]
        short = pick_short_edge(self.cfg, self.train)
        max_size = self.cfg.max_size_train if self.train else self.cfg.max_size_test
        rh, rw = resize_shape(h, w, short, max_size)
        image, id_map = resize_sample(image, id_map, (rh, rw))
        if self.train and self.cfg.random_flip and np.random.rand() < 0.5:
            image, id_map = image[:, ::-1], id_map[:, ::-1]
        targets = build_targets(np.ascontiguousarray(id_map), rec["ann"]["segments_info"], self.meta)
        info = {"image_id": rec["image"]["id"], "file_name": rec["image"]["file_name"],
                "original_size": (h, w), "resized_size": (rh, rw),
                "png_name": rec["ann"]["file_name"]}
        return {"image": normalize(image, self.cfg), "targets": targets, "info": info}
