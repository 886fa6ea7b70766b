"""Cityscapes from its official layout, labels from ``cityscapesscripts``.

``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_instanceIds.png``:
id >= 1000 is an instance of label ``id // 1000``; id < 1000 is a label id. A thing label
without an instance id is a crowd region (ignored); labels with ``ignoreInEval`` are void.
Each frame becomes a COCO-panoptic style record (segment id = instanceIds value, category id
= Cityscapes label id), so targets, PQ and writers are shared with COCO.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from sepsnet.config import DataConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset, read_rgb
from sepsnet.data.metadata import ClassMetadata
from sepsnet.errors import DataError


def read_instance_ids(path: Path) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise DataError(f"Cityscapes annotation not found: {path}")
    ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if ids is None or ids.ndim != 2:
        raise DataError(f"cannot read 16-bit instanceIds PNG: {path}")
    return ids.astype(np.int64)


def instance_ids_to_panoptic(ids: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """instanceIds map -> (panoptic id map with 0 = void, COCO ``segments_info``)."""
    from cityscapesscripts.helpers.labels import id2label

    out = np.zeros_like(ids)
    segments = []
    values, areas = np.unique(ids, return_counts=True)
    for value, area in zip(values.tolist(), areas.tolist()):
        label_id = value // 1000 if value >= 1000 else value
        label = id2label.get(label_id)
        if label is None or label.ignoreInEval:
            continue
        mask = ids == value
        ys, xs = np.nonzero(mask)
        out[mask] = value
        segments.append({"id": int(value), "category_id": int(label_id), "area": int(area),
                         "iscrowd": int(label.hasInstances and value < 1000),
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
    return out, segments


class CityscapesDataset(CocoPanopticDataset):
    """Same items as :class:`CocoPanopticDataset`, read from the Cityscapes layout."""

    def __init__(self, root: str | Path, split: str, cfg: DataConfig, train: bool) -> None:  # noqa: D107
        Dataset.__init__(self)
        root = Path(root)
        img_root, gt_root = root / "leftImg8bit" / split, root / "gtFine" / split
        for folder in (img_root, gt_root):
            if not folder.is_dir():
                raise DataError(f"Cityscapes folder not found: {folder}")
        self.meta = ClassMetadata.cityscapes()
        self.records = []
        for i, img in enumerate(sorted(img_root.glob("*/*_leftImg8bit.png"))):
            stem = img.name[: -len("_leftImg8bit.png")]
            gt = gt_root / img.parent.name / f"{stem}_gtFine_instanceIds.png"
            self.records.append({"image": {"id": i, "file_name": str(img.relative_to(img_root)), "path": img},
                                 "ann": {"image_id": i, "file_name": f"{stem}.png", "path": gt}})
        if not self.records:
            raise DataError(f"no *_leftImg8bit.png images under {img_root}")
        self.image_dir, self.png_dir, self.json_path = img_root, gt_root, gt_root
        self.cfg, self.train, self.skip_bad = cfg, train, cfg.skip_bad

    def load_gt(self, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        return instance_ids_to_panoptic(read_instance_ids(self.records[index]["ann"]["path"]))

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        rec = self.records[index]
        image = read_rgb(rec["image"]["path"])
        id_map, segments = self.load_gt(index)
        if image.shape[:2] != id_map.shape:
            raise DataError(f"{rec['image']['path']} and its instanceIds PNG differ in size")
        return image, id_map, {**rec, "ann": {**rec["ann"], "segments_info": segments}}
