"""Cityscapes from its official layout, labels from ``cityscapesscripts``.

``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_instanceIds.png``:
id >= 1000 is an instance of label ``id // 1000``; id < 1000 is a label id. A thing label
without an instance id is a crowd region (ignored in training, crowd in PQ); labels with
``ignoreInEval`` are void. Each frame becomes a COCO-panoptic record (segment id = instanceIds
value, category id = Cityscapes label id, image id = ``{city}_{seq}_{frame}``) exactly as
``cityscapesscripts.preparation.createPanopticImgs`` converts it, so targets, PQ and writers
are shared with COCO. :func:`convert_to_coco_panoptic` writes that conversion to disk.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from sepsnet.config import DataConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset, decode_image_file
from sepsnet.data.metadata import ClassMetadata
from sepsnet.errors import DataError
from sepsnet.fileio import atomic_write_bytes

PathLike = str | Path
IMG_SUFFIX, GT_SUFFIX = "_leftImg8bit.png", "_gtFine_instanceIds.png"


def read_instance_ids(path: PathLike) -> np.ndarray:
    """16-bit ``*_gtFine_instanceIds.png`` -> int64 (H,W); DataError naming the file."""
    ids = decode_image_file(path, cv2.IMREAD_UNCHANGED, "Cityscapes annotation")
    if ids is None or ids.ndim != 2:
        raise DataError(f"cannot read single-channel instanceIds PNG: {path}")
    return ids.astype(np.int64)


def instance_ids_to_panoptic(ids: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """instanceIds map -> (panoptic id map with 0 = void, COCO ``segments_info``)."""
    from cityscapesscripts.helpers.labels import id2label

    out = np.zeros_like(ids, dtype=np.int64)
    segments = []
    values, inverse, areas = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(ids.shape)
    for k, (value, area) in enumerate(zip(values.tolist(), areas.tolist())):
        label_id = value // 1000 if value >= 1000 else value
        label = id2label.get(label_id)
        if label is None or label.ignoreInEval:
            continue
        mask = inverse == k
        out[mask] = value
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        segments.append({"id": int(value), "category_id": int(label_id), "area": int(area),
                         "iscrowd": int(label.hasInstances and value < 1000),
                         "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]})
    return out, segments


def find_frames(root: PathLike, split: str) -> list[tuple[str, Path, Path]]:
    """(image id, image path, instanceIds path) for every frame of ``split``, sorted."""
    root = Path(root)
    img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (img_root, gt_root):
        if not folder.is_dir():
            raise DataError(f"Cityscapes folder not found: {folder}")
    frames = []
    for img in sorted(img_root.glob(f"*/*{IMG_SUFFIX}")):
        stem = img.name[: -len(IMG_SUFFIX)]
        frames.append((stem, img, gt_root / img.parent.name / f"{stem}{GT_SUFFIX}"))
    if not frames:
        raise DataError(f"no *{IMG_SUFFIX} images under {img_root}")
    return frames


class CityscapesDataset(CocoPanopticDataset):
    """Same items as :class:`CocoPanopticDataset`, read from the Cityscapes layout."""

    def __init__(self, root: PathLike, split: str, cfg: DataConfig, train: bool,
                 skip_bad: bool | None = None) -> None:
        Dataset.__init__(self)
        root = Path(root)
        self.meta = ClassMetadata.cityscapes()
        self.records = []
        for stem, img, gt in find_frames(root, split):
            self.records.append({"image": {"id": stem, "file_name": f"{img.parent.name}/{img.name}"},
                                 "ann": {"image_id": stem, "file_name": f"{stem}_gtFine_panoptic.png"},
                                 "image_path": img, "png_path": gt})
        self.image_dir, self.png_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        self.json_path = self.png_dir  # named in error messages
        self.cfg, self.train = cfg, train
        self.skip_bad = cfg.skip_bad if skip_bad is None else skip_bad

    def load_gt(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Panoptic id map + ``segments_info`` converted from the instanceIds PNG."""
        return instance_ids_to_panoptic(read_instance_ids(self.records[index]["png_path"]))


def _png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def convert_to_coco_panoptic(root: PathLike, split: str, out_dir: PathLike | None = None) -> Path:
    """Write ``out_dir/cityscapes_panoptic_{split}.json`` + ``out_dir/cityscapes_panoptic_{split}/``
    (``{id}_gtFine_panoptic.png``), the format of ``cityscapesscripts`` createPanopticImgs with
    label ids as category ids, for PQ evaluation with COCO tools. Images' ``file_name`` is
    ``{city}/{id}_leftImg8bit.png`` so ``CocoPanopticDataset(json, png_dir, leftImg8bit/{split})``
    loads the result. Default ``out_dir``: ``root/gtFine``. Returns the JSON path."""
    frames = find_frames(root, split)
    out = Path(out_dir) if out_dir is not None else Path(root) / "gtFine"
    png_dir = out / f"cityscapes_panoptic_{split}"
    png_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for stem, img, gt in frames:
        id_map, segments = instance_ids_to_panoptic(read_instance_ids(gt))
        rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 65536], axis=-1).astype(np.uint8)
        name = f"{stem}_gtFine_panoptic.png"
        atomic_write_bytes(png_dir / name, _png_bytes(rgb), fsync=False)
        h, w = id_map.shape
        images.append({"id": stem, "file_name": f"{img.parent.name}/{img.name}", "height": int(h), "width": int(w)})
        annotations.append({"image_id": stem, "file_name": name, "segments_info": segments})
    from cityscapesscripts.helpers.labels import id2label

    categories = [{**c, "supercategory": id2label[c["id"]].category}
                  for c in sorted(ClassMetadata.cityscapes().categories(), key=lambda c: c["id"])]
    json_path = out / f"cityscapes_panoptic_{split}.json"
    doc = {"images": images, "annotations": annotations, "categories": categories}
    atomic_write_bytes(json_path, json.dumps(doc).encode())
    return json_path
