"""The tiny model's dense outputs on a shipped photo, resized and padded as evaluation does (shared by
the post-processing tests that compare with the reference on real photos)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import torch

from sepsnet.config import load_config, parse_overrides
from sepsnet.data.coco_panoptic import read_rgb
from sepsnet.data.transforms import normalize, pad_to, resize_shape
from sepsnet.model import build_model

ROOT = Path(__file__).resolve().parents[1]
#: low thresholds, so that a barely trained model still gives instances and stuff segments
LOW_THRESHOLDS = ["data.min_size_test=160", "data.max_size_test=256", "postprocess.score_thresh=0.005",
                  "postprocess.instance_score_thresh=0.0", "postprocess.stuff_area_limit=16"]


def photo_dense(photo: Path, overrides: list[str], seed: int = 5
                ) -> tuple[Any, Any, dict[str, torch.Tensor], list[tuple[tuple[int, int], tuple[int, int]]]]:
    """(model, cfg, dense outputs, image sizes) for ``photo`` with a seeded tiny model in eval mode."""
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides(LOW_THRESHOLDS + overrides))
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    rgb = read_rgb(photo)
    h, w = rgb.shape[:2]
    rh, rw = resize_shape(h, w, cfg.data.min_size_test, cfg.data.max_size_test)
    img = normalize(cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_LINEAR), cfg.data)
    x = torch.zeros(1, 3, pad_to(rh, cfg.data.size_divisibility), pad_to(rw, cfg.data.size_divisibility))
    x[0, :, :rh, :rw] = img
    with torch.inference_mode():
        dense = model.forward_dense(x)
    return model, cfg, dense, [((rh, rw), (h, w))]
