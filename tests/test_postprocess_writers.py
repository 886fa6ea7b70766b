"""Writers: perfect predictions from real ground truth give PQ = 1.0 (COCO via panopticapi,
Cityscapes via cityscapesscripts); overlay rendering; atomic writes."""
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from sepsnet.config import PostprocessConfig
from sepsnet.errors import ConfigError
from sepsnet.postprocess.fusion import panoptic_fusion
from sepsnet.postprocess.results import PanopticResult
from sepsnet.postprocess.writers import CityscapesPanopticWriter, CocoPanopticWriter, render_overlay, write_overlay

from _samples import COCO_SAMPLE

COCO = COCO_SAMPLE
PERFECT = PostprocessConfig(stuff_area_limit=1, instance_score_thresh=0.5, overlap_thresh=0.5)


def _read_ids(path: Path) -> np.ndarray:
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _fuse(instances, stuff_map, num_stuff):
    """instances: list of (bool mask np, contiguous class); stuff_map: contiguous labels, S = none."""
    h, w = stuff_map.shape
    empty = torch.zeros(0, h, w, dtype=torch.bool)
    masks = torch.from_numpy(np.stack([m for m, _ in instances])) if instances else empty
    classes = torch.tensor([c for _, c in instances], dtype=torch.long)
    scores = torch.linspace(0.99, 0.6, len(instances))
    id_map, segs = panoptic_fusion(masks, scores, classes, torch.from_numpy(stuff_map), PERFECT, num_stuff)
    return PanopticResult(id_map=id_map, segments_info=segs, image_size=(h, w))


def _coco_meta():
    cats = json.loads((COCO / "panoptic_coco_categories.json").read_text())
    return {"things": [c for c in cats if c["isthing"]], "stuff": [c for c in cats if not c["isthing"]]}


def test_coco_round_trip_pq_is_one(tmp_path):
    from panopticapi.evaluation import pq_compute

    meta = _coco_meta()
    thing_idx = {c["id"]: i for i, c in enumerate(meta["things"])}
    stuff_idx = {c["id"]: i for i, c in enumerate(meta["stuff"])}
    gt = json.loads((COCO / "panoptic_examples.json").read_text())
    writer = CocoPanopticWriter(tmp_path, meta)
    n_things = 0
    for ann in gt["annotations"]:
        ids = _read_ids(COCO / "panoptic" / ann["file_name"])
        stuff = np.full(ids.shape, len(meta["stuff"]), np.int64)
        instances = []
        for s in ann["segments_info"]:
            m = ids == s["id"]
            if s["category_id"] in stuff_idx:
                stuff[m] = stuff_idx[s["category_id"]]
            elif not s["iscrowd"]:
                instances.append((m, thing_idx[s["category_id"]]))
        n_things += len(instances)
        res = _fuse(instances, stuff, len(meta["stuff"]))
        writer.add(res, ann["image_id"], ann["file_name"])
    pred_json = writer.close()
    assert n_things > 10
    assert not list(tmp_path.rglob("*.tmp"))
    gt_json = tmp_path / "gt.json"
    categories = json.loads((COCO / "panoptic_coco_categories.json").read_text())
    gt_json.write_text(json.dumps({**gt, "categories": categories}))
    out = pq_compute(str(gt_json), str(pred_json), str(COCO / "panoptic"), str(writer.png_dir))
    assert out["All"]["pq"] == pytest.approx(1.0) and out["Things"]["n"] >= 3 and out["Stuff"]["n"] >= 3
    from sepsnet.eval.pq import pq_compute_files  # our evaluator agrees

    ours = pq_compute_files(str(gt_json), str(pred_json), str(COCO / "panoptic"), str(writer.png_dir), workers=1)
    assert ours["All"]["pq"] == pytest.approx(1.0) and ours["Things"]["n"] == out["Things"]["n"]


def test_cityscapes_round_trip_pq_is_one(cityscapes_root: Path, tmp_path: Path) -> None:
    from cityscapesscripts.evaluation.evalPanopticSemanticLabeling import evaluatePanoptic
    from cityscapesscripts.helpers.labels import id2label, labels
    from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic

    city = cityscapes_root

    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    convert2panoptic(str(city / "gtFine"), str(gt_dir), False, ["val"])
    evaluated = [lb for lb in labels if not lb.ignoreInEval]
    things = [lb for lb in evaluated if lb.hasInstances]
    stuff = [lb for lb in evaluated if not lb.hasInstances]
    meta = SimpleNamespace(things=[SimpleNamespace(id=lb.id, name=lb.name, color=lb.color) for lb in things],
                           stuff=[SimpleNamespace(id=lb.id, name=lb.name, color=lb.color) for lb in stuff])
    src = next((city / "gtFine" / "val").rglob("*_instanceIds.png"))
    inst = cv2.imread(str(src), cv2.IMREAD_UNCHANGED).astype(np.int64)
    stuff_map = np.full(inst.shape, len(stuff), np.int64)
    instances = []
    for sid in np.unique(inst):
        label = id2label[int(sid) // 1000 if sid >= 1000 else int(sid)]
        if label.ignoreInEval:
            continue
        if label.hasInstances and sid >= 1000:
            instances.append((inst == sid, things.index(label)))
        elif not label.hasInstances:
            stuff_map[inst == sid] = stuff.index(label)
    assert len(instances) >= 2
    res = _fuse(instances, stuff_map, len(stuff))
    image_id = src.name.replace("_gtFine_instanceIds.png", "")
    writer = CityscapesPanopticWriter(tmp_path / "pred", meta)
    png = writer.add(res, image_id)
    pred_json = writer.close()
    ids = _read_ids(png)
    thing_ids = sorted(int(i) for i in np.unique(ids) if i >= 1000)
    assert thing_ids and all(i // 1000 in {lb.id for lb in things} for i in thing_ids)
    out = evaluatePanoptic(str(gt_dir / "cityscapes_panoptic_val.json"), str(gt_dir / "cityscapes_panoptic_val"),
                           str(pred_json), str(writer.png_dir), str(tmp_path / "results.json"))
    assert out["All"]["pq"] == pytest.approx(1.0)


def test_overlay_and_errors(tmp_path):
    meta = _coco_meta()
    img = np.full((40, 60, 3), 100, np.uint8)
    id_map = torch.zeros(40, 60, dtype=torch.int32)
    id_map[5:25, 5:30] = 1
    id_map[30:, :] = 2
    segs = [{"id": 1, "category_id": 0, "isthing": True, "score": 0.9, "area": 500, "bbox": [5, 5, 25, 20]},
            {"id": 2, "category_id": 1, "isthing": False, "score": 1.0, "area": 600, "bbox": [0, 30, 60, 10]}]
    res = PanopticResult(id_map=id_map, segments_info=segs, image_size=(40, 60))
    out = render_overlay(img, res, meta, labels=False)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[0, 50] == 100).all() and not (out[15, 15] == 100).all()  # void untouched, segment tinted
    assert (out[5, 15] == 255).all()  # white contour on the thing's border
    path = write_overlay(tmp_path / "o.png", img, res, meta)
    back = cv2.imread(str(path))
    assert back.shape == img.shape and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(Exception, match="does not match"):
        render_overlay(img[:10], res, meta)
    bad = PanopticResult(id_map=id_map, segments_info=[{**segs[0], "category_id": 999}], image_size=(40, 60))
    with pytest.raises(ConfigError, match="outside metadata"):
        CocoPanopticWriter(tmp_path, meta).add(bad, 1)
    with pytest.raises(ConfigError, match="things"):
        CocoPanopticWriter(tmp_path, {"classes": []})
