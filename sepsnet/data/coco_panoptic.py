"""COCO panoptic dataset: JSON + PNG folder (id = R + 256 G + 256^2 B, 0 = void) + image folder.

Standard layout (:meth:`CocoPanopticDataset.from_root`): ``root/annotations/panoptic_{split}.json``,
``root/annotations/panoptic_{split}/*.png`` and ``root/{split}/*`` — the layout of COCO and of
``sepsnet-synth``. Other layouts are given as explicit paths (categories optionally from a
separate JSON, as in the panopticapi sample). Items follow docs/INTERFACES.md.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from sepsnet.config import DataConfig
from sepsnet.data.metadata import ClassMetadata
from sepsnet.data.panoptic_ids import rgb_to_id  # re-exported: the light home of the id formula
from sepsnet.data.targets import build_targets
from sepsnet.data.transforms import hflip_sample, normalize, pick_short_edge, resize_sample, resize_shape
from sepsnet.errors import DataError

log = logging.getLogger(__name__)
PathLike = str | Path


def decode_image_file(path: PathLike, flags: int, what: str) -> np.ndarray | None:
    """``cv2.imdecode`` of a file (paths with any characters), None when undecodable;
    DataError naming ``what`` and the file when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    data = np.fromfile(str(path), dtype=np.uint8)
    return cv2.imdecode(data, flags) if data.size else None


def read_rgb(path: PathLike) -> np.ndarray:
    """Read a photo as HxWx3 uint8 RGB; DataError naming the file otherwise.

    Accepted: 8-bit colour, and 8-bit grey or RGBA (legitimate photos: COCO has grey images),
    converted to RGB (grey replicated, alpha dropped; EXIF orientation applied, as
    ``cv2.IMREAD_COLOR`` does). Rejected: missing, empty or undecodable files, zero-size images,
    and any bit depth other than 8 (16-bit, float: scaling them down would silently change
    the pixels the model sees)."""
    img = decode_image_file(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR, "image")
    if img is None:
        raise DataError(f"cannot decode image (corrupt, empty or unsupported format): {path}")
    if img.size == 0:
        raise DataError(f"image has zero size {img.shape}: {path}")
    if img.dtype != np.uint8:
        raise DataError(f"image must have 8 bits per channel, got {img.dtype} {img.shape}: {path}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise DataError(f"image must be grey, RGB or RGBA, got shape {img.shape}: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGB)


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """COCO panoptic PNG (8-bit RGB) -> int64 id map (R + 256 G + 256^2 B)."""
    raw = decode_image_file(path, cv2.IMREAD_UNCHANGED, "panoptic PNG")
    if raw is not None and raw.ndim == 3 and raw.shape[2] == 4:
        raw = raw[..., :3]  # RGBA written by some tools: alpha carries no id
    if raw is None or raw.ndim != 3 or raw.shape[2] != 3 or raw.dtype != np.uint8:
        desc = "undecodable" if raw is None else f"{raw.dtype} {raw.shape}"
        raise DataError(f"panoptic PNG must be 8-bit RGB, {path} is {desc}")
    return rgb_to_id(raw, bgr=True)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"malformed JSON in {path}: {exc}") from None


def load_panoptic_json(path: PathLike, categories_path: PathLike | None = None) -> dict[str, Any]:
    """Read and validate a COCO panoptic JSON (``categories`` optionally from another file)."""
    path = Path(path)
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be an object (not a COCO panoptic file?)")
    if categories_path is not None:
        cats = _read_json(Path(categories_path), "categories file")
        data["categories"] = cats.get("categories") if isinstance(cats, dict) else cats
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or invalid '{key}' list (not a COCO panoptic file?)")
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not {"image_id", "file_name"} <= ann.keys() \
                or not isinstance(ann.get("segments_info"), list):
            raise DataError(f"{path}: annotation without image_id/file_name/segments_info list: {str(ann)[:120]}")
        for seg in ann["segments_info"]:
            if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
                raise DataError(f"{path}: segment without id/category_id in {ann['file_name']}: {seg!r}")
    return data


class CocoPanopticDataset(Dataset):
    """Items: ``image`` (3,h,w) normalised, ``targets`` (INTERFACES.md), ``info`` (``image_id``,
    ``file_name``, ``original_size``, ``resized_size``, ``flipped``, ``png_name``, ``gt_png``, and
    ``index``: the index of the sample actually returned).

    ``skip_bad``: ``dataset[i]`` of a bad sample returns the next readable one instead (a training
    convenience; ``info["index"]`` tells). :meth:`load_item` never substitutes: evaluation uses it."""

    def __init__(self, json_path: PathLike, png_dir: PathLike, image_dir: PathLike, cfg: DataConfig,
                 train: bool, categories_path: PathLike | None = None, skip_bad: bool | None = None) -> None:
        self.json_path, self.png_dir, self.image_dir = Path(json_path), Path(png_dir), Path(image_dir)
        for folder in (self.png_dir, self.image_dir):
            if not folder.is_dir():
                raise DataError(f"dataset folder not found: {folder}")
        data = load_panoptic_json(json_path, categories_path)
        self.meta = ClassMetadata.from_coco_categories(data["categories"], str(categories_path or json_path))
        known = self.meta.lookup()
        images = {img.get("id"): img for img in data["images"] if isinstance(img, dict)}
        self.records: list[dict[str, Any]] = []
        for ann in data["annotations"]:
            img = images.get(ann["image_id"])
            if img is None or "file_name" not in img:
                raise DataError(f"{json_path}: annotation {ann['file_name']} refers to unknown image id "
                                f"{ann['image_id']}")
            bad = [s["category_id"] for s in ann["segments_info"] if int(s["category_id"]) not in known]
            if bad:
                raise DataError(f"{json_path}: {ann['file_name']} uses unknown category ids {bad}")
            self.records.append({"image": img, "ann": ann, "image_path": self.image_dir / img["file_name"],
                                 "png_path": self.png_dir / ann["file_name"]})
        self.cfg = cfg
        self.train = train
        self.skip_bad = cfg.skip_bad if skip_bad is None else skip_bad

    @classmethod
    def from_root(cls, root: PathLike, split: str, cfg: DataConfig, train: bool,
                  skip_bad: bool | None = None) -> CocoPanopticDataset:
        """``root/annotations/panoptic_{split}.json``, ``root/annotations/panoptic_{split}/``,
        ``root/{split}/``."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset folder not found: {root}")
        ann = root / "annotations"
        return cls(ann / f"panoptic_{split}.json", ann / f"panoptic_{split}", root / split, cfg, train,
                   skip_bad=skip_bad)

    def __len__(self) -> int:
        return len(self.records)

    def load_gt(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Ground truth at the original resolution: id map + COCO ``segments_info``."""
        rec = self.records[index]
        return read_panoptic_png(rec["png_path"]), rec["ann"]["segments_info"]

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(RGB image, id map, record with ``segments_info``) at the original size."""
        rec = self.records[index]
        image = read_rgb(rec["image_path"])
        id_map, segments = self.load_gt(index)
        if image.shape[:2] != id_map.shape:
            raise DataError(f"image {rec['image_path']} is {image.shape[:2]} but its panoptic PNG "
                            f"{rec['png_path']} is {id_map.shape}")
        return image, id_map, {**rec, "index": index, "ann": {**rec["ann"], "segments_info": segments}}

    def prepare(self, image: np.ndarray, id_map: np.ndarray, rec: dict[str, Any], short: int,
                flip: bool) -> dict[str, Any]:
        """Deterministic part of an item: resize (shorter edge ``short``), optional flip,
        targets, normalisation."""
        h, w = image.shape[:2]
        max_size = self.cfg.max_size_train if self.train else self.cfg.max_size_test
        rh, rw = resize_shape(h, w, short, max_size)
        image, id_map = resize_sample(image, id_map, (rh, rw))
        if flip:
            image, id_map = hflip_sample(image, id_map)
        image_id = rec["image"]["id"]
        targets = build_targets(id_map, rec["ann"]["segments_info"], self.meta, image_id=image_id)
        info = {"image_id": image_id, "file_name": rec["image"]["file_name"], "original_size": (h, w),
                "resized_size": (rh, rw), "flipped": bool(flip), "png_name": rec["ann"]["file_name"],
                "gt_png": str(rec["png_path"]), "index": rec.get("index")}
        return {"image": normalize(image, self.cfg), "targets": targets, "info": info}

    def load_item(self, index: int) -> dict[str, Any]:
        """The item of exactly sample ``index``, never a substitute (DataError naming the file)."""
        return self._item(*self.load_raw(index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(len(self)):
            i = (index + k) % len(self)
            try:
                image, id_map, rec = self.load_raw(i)
                break
            except DataError as exc:
                if not self.skip_bad:
                    raise
                log.warning("skipping bad sample %d: %s", i, exc)
        else:
            raise DataError(f"no readable sample in {self.json_path} (all {len(self)} skipped)")
        return self._item(image, id_map, rec)

    def _item(self, image: np.ndarray, id_map: np.ndarray, rec: dict[str, Any]) -> dict[str, Any]:
        short = pick_short_edge(self.cfg, self.train)
        flip = bool(self.train and self.cfg.random_flip and np.random.rand() < 0.5)
        return self.prepare(image, id_map, rec, short, flip)
