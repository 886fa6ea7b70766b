"""Instance mask / box AP through pycocotools COCOeval."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from sepsnet.errors import DataError
from sepsnet.eval.instance_ap import InstanceAPAccumulator, instances_from_panoptic
from sepsnet.eval.pq import read_id_png

from _samples import COCO_SAMPLE

SAMPLE = str(COCO_SAMPLE)


def _sample():
    data = json.load(open(os.path.join(SAMPLE, "panoptic_examples.json")))
    cats = {c["id"]: c for c in data["categories"]}
    out = []
    for ann in data["annotations"]:
        ids = read_id_png(os.path.join(SAMPLE, "panoptic", ann["file_name"]))
        out.append((ann["image_id"], *instances_from_panoptic(ids, ann["segments_info"], cats)))
    return cats, out


def test_perfect_degraded_and_empty_predictions():
    cats, images = _sample()
    n_things = sum(len(c) for _, _, c, _ in images)
    assert n_things == sum(1 for a in json.load(open(os.path.join(SAMPLE, "panoptic_examples.json")))
                           ["annotations"] for s in a["segments_info"] if cats[s["category_id"]]["isthing"])

    def run(degrade: str) -> dict:
        acc = InstanceAPAccumulator(cats)
        rng = np.random.default_rng(0)
        for image_id, masks, cls, crowd in images:
            keep = crowd == 0
            pm, pc = masks[keep], cls[keep]
            scores = rng.uniform(0.5, 1.0, len(pc))
            if degrade == "shift":  # half of the instances shifted by 40% of their width
                for i in range(0, len(pm), 2):
                    xs = np.nonzero(pm[i].any(0))[0]
                    pm[i] = np.roll(pm[i], max(2, int(0.4 * (xs.max() - xs.min() + 1))), axis=1)
            if degrade == "empty":
                pm, pc, scores = pm[:0], pc[:0], scores[:0]
            acc.add(image_id, masks, cls, pm, scores, pc, gt_iscrowd=crowd)
        return acc.summary()

    perfect, shifted, empty = run("none"), run("shift"), run("empty")
    for kind in ("segm", "bbox"):
        for k in ("AP", "AP50", "AP75"):
            assert perfect[kind][k] == pytest.approx(1.0), (kind, k)
            assert empty[kind][k] == 0.0
        assert 0.0 < shifted[kind]["AP"] < 0.9 * perfect[kind]["AP"], (kind, shifted[kind])


def test_boxes_given_and_errors():
    gt = np.zeros((1, 32, 32), bool)
    gt[0, 4:20, 6:18] = True
    acc = InstanceAPAccumulator([{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}])
    acc.add(0, gt, [1], gt, [0.9], [1], pred_boxes=np.array([[6.0, 4.0, 18.0, 20.0]]))
    acc.add(1, gt[:0], [], gt[:0], [], [], image_size=(32, 32))  # an image with nothing
    r = acc.summary()
    assert r["bbox"]["AP"] == pytest.approx(1.0) and r["segm"]["AP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="not a thing category"):
        acc.add(2, gt, [2], gt, [0.9], [1])
    with pytest.raises(DataError, match="added twice"):
        acc.add(0, gt, [1], gt, [0.9], [1])
    with pytest.raises(DataError, match="shape"):
        acc.add(3, gt, [1], gt[:, :16], [0.9], [1])
    with pytest.raises(DataError, match="scores"):
        acc.add(4, gt, [1], gt, [0.9, 0.8], [1])
    assert all(math.isnan(v) for v in InstanceAPAccumulator([{"id": 1}]).summary()["segm"].values())
