"""Cityscapes loader on a synthetic tree in the official layout (and the real sample frame where one is
available): metadata from cityscapesscripts, targets equal the instanceIds PNG (expected values computed
here with PIL + the label table), crowd handling, and
the COCO-panoptic conversion equal to cityscapesscripts' own createPanopticImgs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, labels
from PIL import Image

from sepsnet.config import DataConfig
from sepsnet.data.cityscapes import CityscapesDataset, convert_to_coco_panoptic
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.metadata import ClassMetadata
from sepsnet.errors import DataError

CFG = DataConfig(min_size_test=0)


def gt_png(root: Path) -> Path:
    return next((root / "gtFine" / "val").rglob("*_gtFine_instanceIds.png"))


def stem_of(root: Path) -> str:
    return gt_png(root).name.replace("_gtFine_instanceIds.png", "")


def test_metadata_from_cityscapesscripts() -> None:
    meta = ClassMetadata.cityscapes()
    evald = sorted((lab for lab in labels if not lab.ignoreInEval), key=lambda lab: lab.trainId)
    assert meta.thing_names == [lab.name for lab in evald if lab.hasInstances]
    assert meta.thing_names == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert meta.stuff_names == [lab.name for lab in evald if not lab.hasInstances] and meta.num_stuff == 11
    assert [s["id"] for s in meta.stuff][:2] == [id2label[7].id, id2label[8].id]  # road, sidewalk
    assert meta.to_contiguous(26) == (True, 2) and meta.to_dataset_id(False, 10) == 23  # car, sky


def expected_targets(raw: np.ndarray) -> tuple[dict[int, tuple[int, int]], np.ndarray]:
    """instance value -> (area, thing index); stuff target from the label table."""
    evald = sorted((lab for lab in labels if not lab.ignoreInEval), key=lambda lab: lab.trainId)
    thing_ids = [lab.id for lab in evald if lab.hasInstances]
    stuff_ids = [lab.id for lab in evald if not lab.hasInstances]
    instances, stuff = {}, np.full(raw.shape, 255, np.int64)
    for v in np.unique(raw).tolist():
        lab = id2label[v // 1000 if v >= 1000 else v]
        m = raw == v
        if lab.ignoreInEval:
            continue
        if not lab.hasInstances:
            stuff[m] = stuff_ids.index(lab.id)
        elif v >= 1000:
            stuff[m] = len(stuff_ids)
            instances[v] = (int(m.sum()), thing_ids.index(lab.id))
    return instances, stuff


def test_targets_equal_instance_ids(cityscapes_root: Path) -> None:
    ds = CityscapesDataset(cityscapes_root, "val", CFG, train=False)
    raw = np.asarray(Image.open(gt_png(cityscapes_root))).astype(np.int64)
    instances, stuff = expected_targets(raw)
    assert len(ds) == 1 and len(instances) >= 5
    item = ds[0]
    t, info = item["targets"], item["info"]
    assert info["image_id"] == stem_of(cityscapes_root)
    assert info["original_size"] == raw.shape and item["image"].shape[1:] == raw.shape
    got = sorted((int(m.sum()), int(c)) for m, c in zip(t["masks"], t["classes"]))
    assert got == sorted(instances.values())
    for box, m in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert np.array_equal(t["stuff"].numpy(), stuff)
    gt_ids, segs = ds.load_gt(0)
    for s in segs:
        assert int((gt_ids == s["id"]).sum()) == s["area"] == int((raw == s["id"]).sum())


def copy_city(src: Path, tmp: Path) -> Path:
    root = tmp / "cs"
    shutil.copytree(src, root)
    return root


def test_crowd_region_is_ignored(cityscapes_root: Path, tmp_path: Path) -> None:
    root = copy_city(cityscapes_root, tmp_path)
    gt = gt_png(root)
    raw = np.asarray(Image.open(gt)).astype(np.uint16).copy()
    n_before = len(expected_targets(raw.astype(np.int64))[0])
    car = raw == 26000
    assert car.any()
    raw[car] = 26  # the same car as an unlabelled group of cars (crowd)
    Image.fromarray(raw).save(gt)
    ds = CityscapesDataset(root, "val", CFG, train=False)
    t = ds[0]["targets"]
    instances, stuff = expected_targets(raw.astype(np.int64))
    assert t["boxes"].shape[0] == len(instances) == n_before - 1
    assert (t["stuff"].numpy()[car] == 255).all() and np.array_equal(t["stuff"].numpy(), stuff)
    _, segs = ds.load_gt(0)
    assert [s["iscrowd"] for s in segs if s["id"] == 26] == [1]


def test_conversion_equals_cityscapesscripts(cityscapes_root: Path, tmp_path: Path) -> None:
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    src = cityscapes_root
    convert2panoptic(str(src / "gtFine"), str(ref_dir), False, ["val"])
    ref = json.loads((ref_dir / "cityscapes_panoptic_val.json").read_text())
    ours_json = convert_to_coco_panoptic(src, "val", tmp_path / "ours")
    ours = json.loads(ours_json.read_text())
    assert ours_json == tmp_path / "ours" / "cityscapes_panoptic_val.json"
    key = lambda c: c["id"]  # noqa: E731
    assert [(c["id"], c["name"], c["isthing"]) for c in sorted(ours["categories"], key=key)] == \
        [(c["id"], c["name"], c["isthing"]) for c in sorted(ref["categories"], key=key)]
    assert [a["image_id"] for a in ours["annotations"]] == [a["image_id"] for a in ref["annotations"]] == [stem_of(src)]
    for a, b in zip(ours["annotations"], ref["annotations"]):
        assert a["file_name"] == b["file_name"]
        assert sorted(a["segments_info"], key=key) == sorted(b["segments_info"], key=key)
        png_ours = np.asarray(Image.open(ours_json.parent / "cityscapes_panoptic_val" / a["file_name"]))
        png_ref = np.asarray(Image.open(ref_dir / "cityscapes_panoptic_val" / b["file_name"]))
        assert np.array_equal(png_ours, png_ref)
    # the converted files load through the COCO loader with the same targets
    coco = CocoPanopticDataset(ours_json, ours_json.parent / "cityscapes_panoptic_val",
                               src / "leftImg8bit" / "val", CFG, train=False)
    city = CityscapesDataset(src, "val", CFG, train=False)
    assert coco.meta == city.meta
    a, b = coco[0], city[0]
    assert torch.equal(a["image"], b["image"]) and a["info"]["image_id"] == b["info"]["image_id"]
    for k in ("boxes", "classes", "masks", "stuff"):
        assert torch.equal(a["targets"][k], b["targets"][k])


def test_clear_errors(synthetic_cityscapes: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Cityscapes folder not found: .*leftImg8bit"):
        CityscapesDataset(tmp_path, "val", CFG, train=False)
    with pytest.raises(DataError, match="Cityscapes folder not found: .*train"):
        CityscapesDataset(synthetic_cityscapes, "train", CFG, train=False)
    root = copy_city(synthetic_cityscapes, tmp_path)
    gt = gt_png(root)
    gt.unlink()
    ds = CityscapesDataset(root, "val", CFG, train=False)
    with pytest.raises(DataError, match="annotation not found: .*instanceIds.png"):
        ds[0]
    gt.write_bytes(b"not a png")
    with pytest.raises(DataError, match="instanceIds"):
        ds[0]
