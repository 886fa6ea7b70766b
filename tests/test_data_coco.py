"""COCO panoptic loader on the real panopticapi sample: targets equal the JSON and the PNGs
(expected values computed here from the raw files with PIL), crowd/void handling, layouts,
class metadata, and clear errors for broken datasets."""
import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sepsnet.config import DataConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset, read_rgb
from sepsnet.data.metadata import ClassMetadata
from sepsnet.errors import DataError

from _samples import COCO_SAMPLE

SAMPLE = COCO_SAMPLE
CATS = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
DOC = json.loads((SAMPLE / "panoptic_examples.json").read_text())


def sample(cfg: DataConfig | None = None, **kw) -> CocoPanopticDataset:
    cfg = cfg if cfg is not None else DataConfig(min_size_test=0)
    return CocoPanopticDataset(SAMPLE / "panoptic_examples.json", SAMPLE / "panoptic", SAMPLE / "images", cfg,
                               train=False, categories_path=SAMPLE / "panoptic_coco_categories.json", **kw)


def pil_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def test_metadata_from_categories() -> None:
    meta = sample().meta
    things = sorted(c["id"] for c in CATS if c["isthing"])
    stuff = sorted(c["id"] for c in CATS if not c["isthing"])
    assert [t["id"] for t in meta.things] == things and len(things) == 80
    assert [s["id"] for s in meta.stuff] == stuff and len(stuff) == 53
    by_id = {c["id"]: c for c in CATS}
    assert meta.things[0]["name"] == by_id[things[0]]["name"] and meta.stuff[-1]["color"] == by_id[stuff[-1]]["color"]
    for cid in things + stuff:
        isthing, k = meta.to_contiguous(cid)
        assert isthing == bool(by_id[cid]["isthing"]) and meta.to_dataset_id(isthing, k) == cid
    again = ClassMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta
    with pytest.raises(DataError, match="unknown dataset category id 999"):
        meta.to_contiguous(999)
    with pytest.raises(DataError, match="out of range"):
        meta.to_dataset_id(True, 80)
    with pytest.raises(DataError):
        ClassMetadata.from_dict({"things": []})


def test_targets_equal_json_and_png() -> None:
    ds = sample()
    by_id = {c["id"]: c for c in CATS}
    things = sorted(c["id"] for c in CATS if c["isthing"])
    stuff = sorted(c["id"] for c in CATS if not c["isthing"])
    images = {im["id"]: im for im in DOC["images"]}
    assert len(ds) == len(DOC["annotations"]) == 2
    crowd_seen = 0
    for i, ann in enumerate(DOC["annotations"]):
        ids = pil_ids(SAMPLE / "panoptic" / ann["file_name"])
        item = ds[i]
        t, info = item["targets"], item["info"]
        im = images[ann["image_id"]]
        assert item["image"].shape == (3, im["height"], im["width"]) and item["image"].dtype == torch.float32
        assert info["image_id"] == ann["image_id"] and info["file_name"] == im["file_name"]
        assert info["original_size"] == info["resized_size"] == (im["height"], im["width"])
        assert Path(info["gt_png"]) == SAMPLE / "panoptic" / ann["file_name"]
        # the JSON agrees with the PNG (sanity of the reference itself)
        assert set(np.unique(ids)) - {0} == {s["id"] for s in ann["segments_info"]}
        expected_stuff = np.full(ids.shape, 255, np.int64)
        instances = []
        for s in ann["segments_info"]:
            m = ids == s["id"]
            assert int(m.sum()) == s["area"]
            if not by_id[s["category_id"]]["isthing"]:
                expected_stuff[m] = stuff.index(s["category_id"])
            elif s["iscrowd"]:
                crowd_seen += 1
            else:
                expected_stuff[m] = len(stuff)
                x, y, w, h = s["bbox"]
                instances.append((s["area"], [x, y, x + w, y + h], things.index(s["category_id"]), m))
        assert t["boxes"].shape == (len(instances), 4) and t["masks"].shape == (len(instances), *ids.shape)
        for k, (area, box, cls, m) in enumerate(instances):
            assert int(t["masks"][k].sum()) == area
            assert np.array_equal(t["masks"][k].numpy().astype(bool), m)
            assert t["boxes"][k].tolist() == box
            assert int(t["classes"][k]) == cls
        assert np.array_equal(t["stuff"].numpy(), expected_stuff)
        assert (t["stuff"].numpy()[ids == 0] == 255).all()
    assert crowd_seen == 3  # crowd thing segments: neither instances nor "thing" pixels


def test_resized_targets_stay_consistent() -> None:
    ds = sample(DataConfig(min_size_test=200, max_size_test=1000))
    full = sample()
    for i in range(len(ds)):
        item, ref = ds[i], full[i]
        h, w = item["info"]["resized_size"]
        assert min(h, w) == 200 and item["image"].shape[1:] == (h, w)
        t = item["targets"]
        assert t["stuff"].shape == (h, w) and t["masks"].shape[1:] == (h, w)
        assert 0 < t["boxes"].shape[0] <= ref["targets"]["boxes"].shape[0]
        for box, m in zip(t["boxes"], t["masks"]):
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert set(t["classes"].tolist()) <= set(ref["targets"]["classes"].tolist())


def standard_layout(tmp: Path, split: str = "val") -> Path:
    """The sample rearranged into root/annotations/panoptic_{split}{.json,/} + root/{split}/."""
    root = tmp / "coco"
    shutil.copytree(SAMPLE / "panoptic", root / "annotations" / f"panoptic_{split}")
    shutil.copytree(SAMPLE / "images", root / split)
    doc = dict(DOC, categories=CATS)
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(doc))
    return root


def test_from_root_standard_layout(tmp_path: Path) -> None:
    root = standard_layout(tmp_path)
    ds = CocoPanopticDataset.from_root(root, "val", DataConfig(min_size_test=0), train=False)
    ref = sample()
    assert ds.meta == ref.meta and len(ds) == len(ref)
    for i in range(len(ds)):
        a, b = ds[i], ref[i]
        assert torch.equal(a["image"], b["image"])
        for key in ("boxes", "classes", "masks", "stuff"):
            assert torch.equal(a["targets"][key], b["targets"][key])


def test_clear_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = DataConfig(min_size_test=0)
    with pytest.raises(DataError, match="not found: .*nowhere"):
        CocoPanopticDataset.from_root(tmp_path / "nowhere", "val", cfg, train=False)
    root = standard_layout(tmp_path)
    with pytest.raises(DataError, match="panoptic_train"):
        CocoPanopticDataset.from_root(root, "train", cfg, train=False)  # no such split
    js = root / "annotations" / "panoptic_val.json"
    good = js.read_text()
    js.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match="malformed JSON in .*panoptic_val.json"):
        CocoPanopticDataset.from_root(root, "val", cfg, train=False)
    js.write_text(json.dumps({"images": [], "categories": CATS}))
    with pytest.raises(DataError, match="'annotations'"):
        CocoPanopticDataset.from_root(root, "val", cfg, train=False)
    bad = json.loads(good)
    bad["annotations"][0]["segments_info"][0]["category_id"] = 4242
    js.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="unknown category ids \\[4242\\]"):
        CocoPanopticDataset.from_root(root, "val", cfg, train=False)
    js.write_text(good)
    first = root / "val" / DOC["images"][0]["file_name"]
    first.write_bytes(b"\x00garbage, not a JPEG" * 10)
    ds = CocoPanopticDataset.from_root(root, "val", cfg, train=False)
    with pytest.raises(DataError, match=f"corrupt.*{first.name}"):
        ds[0]
    ds = CocoPanopticDataset.from_root(root, "val", cfg, train=False, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="sepsnet.data.coco_panoptic"):
        item = ds[0]
    assert item["info"]["file_name"] == DOC["images"][1]["file_name"]
    assert item["info"]["index"] == 1  # a substitute says which sample it is
    assert any(first.name in r.getMessage() for r in caplog.records)
    assert ds.load_item(1)["info"]["index"] == 1
    with pytest.raises(DataError, match=f"corrupt.*{first.name}"):
        ds.load_item(0)  # never a substitute, even with skip_bad
    (root / "val" / DOC["images"][1]["file_name"]).unlink()
    with pytest.raises(DataError, match="no readable sample"):
        ds[0]
    shutil.rmtree(root / "annotations" / "panoptic_val")
    with pytest.raises(DataError, match="dataset folder not found: .*panoptic_val"):
        CocoPanopticDataset.from_root(root, "val", cfg, train=False)


def test_read_rgb_modes(tmp_path: Path) -> None:
    """Grey and RGBA photos are converted to RGB; other bit depths, empty files are DataErrors
    naming the file (files written by cv2)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "grey.jpg"), grey)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[..., ::-1], np.full((6, 7), 128, np.uint8)]))
    for name, expected in (("rgb.png", rgb), ("grey.png", np.repeat(grey[..., None], 3, 2)),
                           ("rgba.png", rgb)):
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, expected), name
    jpg = read_rgb(tmp_path / "grey.jpg")
    assert jpg.shape == (6, 7, 3) and (jpg[..., 0] == jpg[..., 2]).all()
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "float.tiff"), rgb.astype(np.float32) / 255)
    (tmp_path / "empty.png").write_bytes(b"")
    for name, why in (("rgb16.png", "8 bits.*uint16"), ("grey16.png", "8 bits.*uint16"),
                      ("float.tiff", "8 bits.*float32"), ("empty.png", "empty")):
        with pytest.raises(DataError, match=f"{why}.*{name}"):
            read_rgb(tmp_path / name)
    # in a dataset: a 16-bit photo is an error naming it, not a silently rescaled image
    root = standard_layout(tmp_path)
    first = root / "val" / DOC["images"][0]["file_name"]
    h, w = DOC["images"][0]["height"], DOC["images"][0]["width"]
    cv2.imwrite(str(first.with_suffix(".png")), np.zeros((h, w, 3), np.uint16))
    first.unlink()
    first.with_suffix(".png").rename(first)  # a PNG behind a .jpg name, as cv2 decodes by content
    ds = CocoPanopticDataset.from_root(root, "val", DataConfig(min_size_test=0), train=False)
    with pytest.raises(DataError, match=f"8 bits.*{first.name}"):
        ds.load_item(0)
