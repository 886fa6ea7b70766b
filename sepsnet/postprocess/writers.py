"""Writers for panoptic results: COCO panoptic (PNG + JSON), Cityscapes panoptic format,
and a visual overlay (OpenCV). Every file is written atomically (temp file + ``os.replace``).

Class metadata: any object (e.g. ``sepsnet.data.metadata.ClassMetadata``) or mapping with
``things`` and ``stuff`` lists of ``{id, name, color}`` in contiguous order; a result's
contiguous ``category_id`` indexes ``things`` when ``isthing`` else ``stuff``.
COCO panoptic PNGs encode segment ids as ``id = R + 256 G + 256^2 B``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sepsnet.errors import ConfigError, DataError
from sepsnet.fileio import atomic_write_bytes
from sepsnet.postprocess.results import PanopticResult

PathLike = str | Path


def class_lists(metadata: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(things, stuff)`` lists of dicts ``{id, name, color}`` from a metadata object/mapping."""
    get = metadata.get if isinstance(metadata, dict) else lambda k: getattr(metadata, k, None)
    things, stuff = get("things"), get("stuff")
    if things is None or stuff is None:
        raise ConfigError(f"class metadata needs 'things' and 'stuff' lists, got {type(metadata).__name__}")

    def as_dict(c: Any) -> dict[str, Any]:
        if isinstance(c, dict):
            return c
        return {"id": c.id, "name": c.name, "color": list(c.color)}

    return [as_dict(c) for c in things], [as_dict(c) for c in stuff]


def categories_json(metadata: Any) -> list[dict[str, Any]]:
    """COCO ``categories`` entries (things first) with ``isthing``."""
    things, stuff = class_lists(metadata)
    return ([{"id": int(c["id"]), "name": c["name"], "color": list(c["color"]), "isthing": 1} for c in things]
            + [{"id": int(c["id"]), "name": c["name"], "color": list(c["color"]), "isthing": 0} for c in stuff])


def _dataset_category(seg: dict[str, Any], things: list, stuff: list) -> dict[str, Any]:
    table = things if seg["isthing"] else stuff
    cid = int(seg["category_id"])
    if not 0 <= cid < len(table):
        kind = "thing" if seg["isthing"] else "stuff"
        raise ConfigError(f"segment {seg['id']}: contiguous {kind} category {cid} outside metadata "
                          f"({len(table)} {kind} classes)")
    return table[cid]


def _atomic_write(path: PathLike, data: bytes) -> None:
    atomic_write_bytes(path, data, fsync=False)


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as JSON."""
    _atomic_write(path, json.dumps(obj, indent=1).encode())


def write_png(path: PathLike, image_rgb: np.ndarray) -> None:
    """Atomically write an RGB (or grey) uint8 image as PNG."""
    img = image_rgb[..., ::-1] if image_rgb.ndim == 3 else image_rgb
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise DataError(f"could not encode PNG for {path}")
    _atomic_write(path, buf.tobytes())


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids (h, w) -> COCO panoptic RGB uint8 (h, w, 3)."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def _id_map_np(result: PanopticResult) -> np.ndarray:
    return result.id_map.detach().to("cpu").numpy() if torch.is_tensor(result.id_map) else np.asarray(result.id_map)


def _remap(result: PanopticResult, metadata: Any, cityscapes_ids: bool) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Dataset category ids for every segment; optionally Cityscapes-style segment ids
    (``category*1000 + k`` for things, ``category`` for stuff)."""
    things, stuff = class_lists(metadata)
    ids = _id_map_np(result)
    segs, lut = [], np.zeros(max([s["id"] for s in result.segments_info], default=0) + 1, np.int64)
    per_class: dict[int, int] = {}
    for s in result.segments_info:
        cat = int(_dataset_category(s, things, stuff)["id"])
        new_id = int(s["id"])
        if cityscapes_ids:
            if s["isthing"]:
                per_class[cat] = per_class.get(cat, 0) + 1
                new_id = cat * 1000 + per_class[cat]
            else:
                new_id = cat
        lut[s["id"]] = new_id
        seg = {"id": new_id, "category_id": cat, "iscrowd": 0, "area": int(s["area"]),
               "bbox": [int(v) for v in s["bbox"]], "isthing": int(bool(s["isthing"]))}
        if s.get("score") is not None:
            seg["score"] = float(s["score"])
        segs.append(seg)
    return lut[ids], segs


class CocoPanopticWriter:
    """Collect results as COCO panoptic predictions: ``out_dir/<png_dir>/<stem>.png`` per image
    and ``out_dir/<json_name>`` (annotations, categories, images) on :meth:`close`."""

    cityscapes_ids = False

    def __init__(self, out_dir: PathLike, metadata: Any, json_name: str = "panoptic_predictions.json",
                 png_dir: str = "panoptic_predictions") -> None:
        self.out_dir = Path(out_dir)
        self.metadata = metadata
        self.json_path = self.out_dir / json_name
        self.png_dir = self.out_dir / png_dir
        self.annotations: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self._written: dict[str, Any] = {}  # PNG name (casefolded) -> the input that took it
        categories_json(metadata)  # validate early

    def png_name(self, image_id: Any, file_name: str | None) -> str:
        return Path(file_name).stem + ".png" if file_name else f"{image_id}.png"

    def add(self, result: PanopticResult, image_id: Any, file_name: str | None = None) -> Path:
        """Write the PNG of one image now; returns its path."""
        ids, segs = _remap(result, self.metadata, self.cityscapes_ids)
        name = self.png_name(image_id, file_name)
        first = self._written.get(name.casefold())
        if first is not None:
            raise DataError(f"{type(self).__name__}: {file_name or image_id!r} would overwrite {name} written for "
                            f"{first!r}; give the images distinct file names (or ids)")
        self._written[name.casefold()] = file_name or image_id
        path = self.png_dir / name
        write_png(path, ids_to_rgb(ids))
        self.annotations.append({"image_id": image_id, "file_name": name, "segments_info": segs})
        h, w = ids.shape
        self.images.append({"id": image_id, "file_name": file_name or name, "height": int(h), "width": int(w)})
        return path

    def close(self) -> Path:
        """Write the JSON; returns its path."""
        write_json(self.json_path, {"images": self.images, "annotations": self.annotations,
                                    "categories": categories_json(self.metadata)})
        return self.json_path


class CityscapesPanopticWriter(CocoPanopticWriter):
    """Cityscapes panoptic format (as ``cityscapesscripts`` createPanopticImgs): COCO-style JSON,
    RGB-encoded PNGs named ``<image_id>_panoptic.png``, category ids = the metadata ids
    (Cityscapes label ids), segment ids ``label*1000 + k`` for things and ``label`` for stuff."""

    cityscapes_ids = True

    def __init__(self, out_dir: PathLike, metadata: Any, json_name: str = "cityscapes_panoptic_predictions.json",
                 png_dir: str = "cityscapes_panoptic_predictions") -> None:
        super().__init__(out_dir, metadata, json_name, png_dir)

    def png_name(self, image_id: Any, file_name: str | None) -> str:
        return f"{image_id}_panoptic.png"


def _instance_color(color: Sequence[int], k: int) -> np.ndarray:
    """Class colour jittered per instance so neighbouring instances differ."""
    rng = np.random.default_rng(k * 7919 + 17)
    return np.clip(np.asarray(color, np.float32) + rng.integers(-40, 41, 3), 0, 255)


def render_overlay(image_rgb: np.ndarray, result: PanopticResult, metadata: Any, alpha: float = 0.5,
                   labels: bool = True) -> np.ndarray:
    """Image blended with coloured segments, contours and class labels -> RGB uint8 (h, w, 3)."""
    ids = _id_map_np(result)
    if image_rgb.ndim != 3 or image_rgb.shape[:2] != ids.shape:
        raise DataError(f"overlay: image shape {image_rgb.shape} does not match panoptic map {ids.shape}")
    things, stuff = class_lists(metadata)
    palette = np.zeros((int(ids.max(initial=0)) + 1, 3), np.float32)
    for k, s in enumerate(result.segments_info):
        cat = _dataset_category(s, things, stuff)
        palette[s["id"]] = _instance_color(cat["color"], k) if s["isthing"] else np.asarray(cat["color"])
    img = image_rgb.astype(np.float32)
    seg = ids > 0
    img[seg] = (1 - alpha) * img[seg] + alpha * palette[ids[seg]]
    out = np.ascontiguousarray(img.round().clip(0, 255).astype(np.uint8))
    scale = max(0.35, min(ids.shape) / 900.0)
    for s in result.segments_info:
        x, y, w, h = (int(v) for v in s["bbox"])
        if w <= 0 or h <= 0:
            continue
        crop = (ids[y:y + h, x:x + w] == s["id"]).astype(np.uint8)
        contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x, y))
        cv2.drawContours(out, contours, -1, (255, 255, 255) if s["isthing"] else (40, 40, 40), 1, cv2.LINE_8)
        if labels:
            dist = cv2.distanceTransform(np.pad(crop, 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
            cy, cx = np.unravel_index(int(dist.argmax()), dist.shape)
            text = _dataset_category(s, things, stuff)["name"]
            if s["isthing"] and s.get("score") is not None:
                text += f" {float(s['score']):.2f}"
            (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            org = (int(min(max(x + cx - tw // 2, 0), ids.shape[1] - tw)),
                   int(min(max(y + cy + th // 2, th), ids.shape[0] - 1)))
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def write_overlay(path: PathLike, image_rgb: np.ndarray, result: PanopticResult, metadata: Any,
                  alpha: float = 0.5) -> Path:
    """Render :func:`render_overlay` and write it atomically as PNG (or JPEG by suffix)."""
    out = render_overlay(image_rgb, result, metadata, alpha)
    suffix = Path(path).suffix.lower() or ".png"
    ok, buf = cv2.imencode(suffix, out[..., ::-1].copy())
    if not ok:
        raise DataError(f"could not encode overlay as {suffix} for {path}")
    _atomic_write(path, buf.tobytes())
    return Path(path)
