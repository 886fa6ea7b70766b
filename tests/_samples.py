"""Where the tests find their sample data: the copy shipped in ``samples/`` (see its README), and a
synthetic Cityscapes tree, since Cityscapes frames may not be redistributed."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO_SAMPLE = ROOT / "samples" / "coco_panoptic_sample"
COCO_IMAGES = sorted((COCO_SAMPLE / "images").glob("*.jpg"))

CITY_STEM = "frankfurt_000000_000294"


def real_cityscapes_sample() -> Path:
    """The real Cityscapes frame of the development machines, or skip with the reason."""
    env = os.environ.get("SEPSNET_CITYSCAPES_SAMPLE")
    candidates = [Path(env)] if env else []
    candidates.append(ROOT.parent / "shared" / "data" / "cityscapes_sample")
    for c in candidates:
        if (c / "leftImg8bit").is_dir() and (c / "gtFine").is_dir():
            return c
    pytest.skip("no real Cityscapes frame here (its licence forbids shipping one); "
                "set SEPSNET_CITYSCAPES_SAMPLE to a folder in the official layout to run this test")


def write_synthetic_cityscapes(root: Path, split: str = "val", city: str = "frankfurt",
                               stem: str = CITY_STEM, size: tuple[int, int] = (128, 256), seed: int = 0) -> Path:
    """A one-frame Cityscapes tree in the official layout (``leftImg8bit/`` + ``gtFine/``).

    instanceIds: stuff and crowd pixels hold the bare label id, thing instances label*1000+k (k from 0,
    as in the real data).
    Content: road (7), sidewalk (8), building (11), vegetation (21), sky (23); three cars (26),
    two persons (24), one bicycle (33); a crowd region of cars (26, no instance id) and the ego
    vehicle (1, ignored in evaluation) along the bottom rows.
    """
    h, w = size
    rng = np.random.default_rng(seed)
    ids = np.full((h, w), 23, np.int32)  # sky
    ids[h // 3:, :] = 11  # building band
    ids[h // 2:, :] = 21  # vegetation
    ids[2 * h // 3:, :] = 7  # road
    ids[2 * h // 3:, : w // 6] = 8  # sidewalk
    ids[h - 6:, :] = 1  # ego vehicle (ignored in evaluation)
    boxes = [(26, 0, 80, 100, 100, 140), (26, 1, 85, 150, 105, 190), (26, 2, 90, 200, 110, 230),
             (24, 0, 60, 20, 100, 32), (24, 1, 62, 40, 100, 50), (33, 0, 90, 55, 105, 75)]
    for label, k, y0, x0, y1, x1 in boxes:
        ids[y0:y1, x0:x1] = label * 1000 + k
    ids[75:90, 232:250] = 26  # a crowd of cars: the bare label id
    label_ids = np.where(ids >= 1000, ids // 1000, ids).astype(np.uint8)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img_dir = root / "leftImg8bit" / split / city
    gt_dir = root / "gtFine" / split / city
    img_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
    Image.fromarray(ids.astype(np.uint16)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
    return root
