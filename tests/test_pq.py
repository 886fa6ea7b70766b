"""PQ evaluator: equality with the COCO panoptic API (panopticapi-lite) on real and generated data."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil

import cv2
import numpy as np
import pytest
from panopticapi import evaluation as ref

from sepsnet.cli.pq import main as pq_main
from sepsnet.errors import DataError
from sepsnet.eval.pq import PQAccumulator, pq_compute_files, read_id_png, rgb_to_id

from _samples import COCO_SAMPLE

SAMPLE = str(COCO_SAMPLE)
CATS = [{"id": i, "name": f"t{i}", "isthing": 1} for i in (1, 2, 3)] + \
       [{"id": i, "name": f"s{i}", "isthing": 0} for i in (10, 11, 12)]
TOL = 1e-9


# ---------------------------------------------------------------- data generation
def id_to_bgr(ids: np.ndarray) -> np.ndarray:
    return np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], -1).astype(np.uint8)


def segments_from(ids: np.ndarray, cat_of: dict, crowd: set = frozenset()) -> list:
    labels, counts = np.unique(ids, return_counts=True)
    return [{"id": int(l), "category_id": int(cat_of[int(l)]), "iscrowd": int(int(l) in crowd),
             "area": int(c)} for l, c in zip(labels, counts) if l != 0]


def make_gt(rng: np.random.Generator, h: int = 48, w: int = 64):
    """Stuff bands, overlapping thing boxes/ellipses, crowd regions and void patches."""
    ids = np.zeros((h, w), np.int64)
    cat_of, crowd, nxt = {}, set(), 1000
    cuts = [0, *sorted(rng.choice(np.arange(6, h - 6), 2, replace=False).tolist()), h]
    stuff_seg = {}
    for a, b in zip(cuts[:-1], cuts[1:]):
        c = int(rng.choice([10, 11, 12]))
        if c not in stuff_seg or rng.random() < 0.3:  # sometimes two segments of one stuff class
            nxt += int(rng.integers(1, 5000))
            stuff_seg[c] = nxt
            cat_of[nxt] = c
        ids[a:b] = stuff_seg[c]
    for _ in range(int(rng.integers(2, 9))):
        nxt += int(rng.integers(1, 5000))
        c = int(rng.choice([1, 2, 3]))
        y, x = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        hh, ww = int(rng.integers(3, h // 2)), int(rng.integers(3, w // 2))
        if rng.random() < 0.5:
            ids[y:y + hh, x:x + ww] = nxt
        else:
            m = np.zeros((h, w), np.uint8)
            cv2.ellipse(m, (x, y), (ww // 2 + 1, hh // 2 + 1), float(rng.integers(0, 180)), 0, 360, 1, -1)
            ids[m > 0] = nxt
        cat_of[nxt] = c
        if rng.random() < 0.2:
            crowd.add(nxt)
    if rng.random() < 0.4:  # several adjacent crowd regions of one thing class (a split crowd box)
        c = int(rng.choice([1, 2, 3]))
        y, x = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 16))
        hh, ww = int(rng.integers(8, h // 2)), int(rng.integers(12, w // 2))
        edges = np.linspace(x, x + ww, int(rng.integers(2, 4)) + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            nxt += int(rng.integers(1, 5000))
            ids[y:y + hh, a:b] = nxt
            cat_of[nxt] = c
            crowd.add(nxt)
    for _ in range(int(rng.integers(0, 4))):  # void
        y, x = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
        ids[y:y + int(rng.integers(2, 12)), x:x + int(rng.integers(2, 16))] = 0
    if rng.random() < 0.3:
        ids[rng.random((h, w)) < 0.05] = 0  # scattered void pixels
    segs = segments_from(ids, cat_of, crowd)
    rng.shuffle(segs)  # segments_info order is not id order (the reference's crowd choice depends on it)
    return ids, segs


def perturb(rng: np.random.Generator, gt: np.ndarray, gt_segs: list, cat_ids: list, thing_ids: list):
    """Merged, split, shifted, relabelled, dropped segments; added ones in void / in crowd."""
    h, w = gt.shape
    pred = np.zeros_like(gt)
    cat_of = {}
    nxt = int(rng.integers(1, 10 ** 6))
    segs = list(gt_segs)
    rng.shuffle(segs)
    for s in segs:
        m = gt == s["id"]
        op = rng.random()
        cat = s["category_id"]
        if op < 0.08:
            continue  # dropped (left void or painted over)
        if op < 0.16:  # relabelled
            cat = int(rng.choice(cat_ids))
        elif op < 0.26:  # shifted
            m = np.roll(m, (int(rng.integers(-6, 7)), int(rng.integers(-6, 7))), (0, 1))
        elif op < 0.34 and pred.any():  # merged into an existing prediction
            target = int(rng.choice(list(cat_of)))
            pred[m] = target
            continue
        elif op < 0.44:  # split in two
            ys, xs = np.nonzero(m)
            if len(xs) > 1:
                cut = int(np.median(xs))
                nxt += int(rng.integers(1, 999))
                pred[m & (np.arange(w)[None, :] > cut)] = nxt
                cat_of[nxt] = cat
                m = m & (np.arange(w)[None, :] <= cut)
        elif op < 0.54:  # noisy boundary
            m = m ^ (rng.random((h, w)) < 0.05)
        nxt += int(rng.integers(1, 999))
        pred[m] = nxt
        cat_of[nxt] = cat
    crowd = [s for s in gt_segs if s["iscrowd"]]
    for _ in range(int(rng.integers(0, 4))):  # added segments in void, crowd or anywhere
        where = rng.random()
        if where < 0.4 and (gt == 0).any():
            ys, xs = np.nonzero(gt == 0)
            cat = int(rng.choice(cat_ids))
        elif where < 0.8 and crowd:
            cs = crowd[int(rng.integers(len(crowd)))]
            ys, xs = np.nonzero(gt == cs["id"])
            cat = cs["category_id"] if rng.random() < 0.7 else int(rng.choice(thing_ids))
        else:
            ys, xs = np.arange(h), np.arange(w)
            cat = int(rng.choice(cat_ids))
        if len(ys) == 0:
            continue
        k = int(rng.integers(len(ys)))
        y, x = int(ys[k]), int(xs[k])
        nxt += int(rng.integers(1, 999))
        pred[max(0, y - int(rng.integers(1, 6))):y + int(rng.integers(1, 6)),
             max(0, x - int(rng.integers(1, 6))):x + int(rng.integers(1, 6))] = nxt
        cat_of[nxt] = cat
    if rng.random() < 0.5:  # fill void predictions from a random stuff class
        nxt += 1
        pred[pred == 0] = nxt
        cat_of[nxt] = int(rng.choice([c for c in cat_ids if c not in thing_ids]))
    psegs = [{"id": s["id"], "category_id": s["category_id"]} for s in segments_from(pred, cat_of)]
    rng.shuffle(psegs)
    return pred, psegs


def write_dataset(root: str, name: str, items: list, cats: list) -> tuple:
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    anns = []
    for image_id, (ids, segs) in enumerate(items):
        fn = f"{image_id:05d}.png"
        cv2.imwrite(os.path.join(folder, fn), id_to_bgr(ids))
        anns.append({"image_id": image_id, "file_name": fn, "segments_info": segs})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"annotations": anns, "categories": cats}, f)
    return path, folder


def reference(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str) -> dict:
    """COCO panoptic API in-process (pq_compute_single_core + PQStat.pq_average)."""
    gt, pred = json.load(open(gt_json)), json.load(open(pred_json))
    cats = {c["id"]: c for c in gt["categories"]}
    preds = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(g, preds[g["image_id"]]) for g in gt["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = ref.pq_compute_single_core(0, pairs, gt_folder, pred_folder, cats)
    out = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        try:
            out[name], per = stat.pq_average(cats, isthing)
        except ZeroDivisionError:  # reference divides by n = 0; ours reports zeros
            out[name], per = {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, None
        if name == "All":
            out["per_class"] = per
    return out


def assert_same(ours: dict, theirs: dict) -> None:
    for name in ("All", "Things", "Stuff"):
        assert ours[name]["n"] == theirs[name]["n"], name
        for k in ("pq", "sq", "rq"):
            assert abs(ours[name][k] - theirs[name][k]) <= TOL, (name, k, ours[name][k], theirs[name][k])
    assert set(ours["per_class"]) == set(theirs["per_class"])
    for c, v in theirs["per_class"].items():
        for k in ("pq", "sq", "rq"):
            assert abs(ours["per_class"][c][k] - v[k]) <= TOL, (c, k)


# ---------------------------------------------------------------- tests
def test_coco_sample_against_itself_and_reference(tmp_path):
    gt_json = os.path.join(SAMPLE, "panoptic_examples.json")
    gt_folder = os.path.join(SAMPLE, "panoptic")
    res = pq_compute_files(gt_json, gt_json, gt_folder, gt_folder, workers=1)
    assert res["All"]["pq"] == 1.0 and res["All"]["n"] > 0
    assert_same(res, reference(gt_json, gt_folder, gt_json, gt_folder))

    data = json.load(open(gt_json))
    cats = [c["id"] for c in data["categories"]]
    things = [c["id"] for c in data["categories"] if c["isthing"]]
    rng = np.random.default_rng(7)
    items = []
    for ann in data["annotations"]:
        gt = read_id_png(os.path.join(gt_folder, ann["file_name"]))
        assert {s["id"] for s in ann["segments_info"]} == set(np.unique(gt).tolist()) - {0}
        for _ in range(3):
            items.append(perturb(rng, gt, ann["segments_info"], cats, things))
    gt_items = [(read_id_png(os.path.join(gt_folder, a["file_name"])), a["segments_info"])
                for a in data["annotations"] for _ in range(3)]
    gj, gf = write_dataset(str(tmp_path), "gt", gt_items, data["categories"])
    pj, pf = write_dataset(str(tmp_path), "pred", items, data["categories"])
    ours = pq_compute_files(gj, pj, gf, pf, workers=1)
    assert 0.0 < ours["All"]["pq"] < 1.0
    assert_same(ours, reference(gj, gf, pj, pf))


def test_many_random_perturbations_match_reference(tmp_path, pq_path):
    rng = np.random.default_rng(0)
    cat_ids, thing_ids = [c["id"] for c in CATS], [1, 2, 3]
    gts = [make_gt(rng) for _ in range(240)]
    preds = [perturb(rng, g, s, cat_ids, thing_ids) for g, s in gts]
    assert sum(s["iscrowd"] for _, segs in gts for s in segs) > 20
    multi_crowd = [any(sum(t["iscrowd"] and t["category_id"] == s["category_id"] for t in segs) > 1
                       for s in segs if s["iscrowd"]) for _, segs in gts]
    assert sum(multi_crowd) > 40  # images with several crowd regions of one class
    assert any([s["id"] for s in segs] != sorted(s["id"] for s in segs) for _, segs in gts)  # shuffled
    assert sum(int((g == 0).sum()) for g, _ in gts) > 1000
    gj, gf = write_dataset(str(tmp_path), "gt", gts, CATS)
    pj, pf = write_dataset(str(tmp_path), "pred", preds, CATS)
    # per image: every image is its own small benchmark against the reference
    gt_anns, pred_anns = json.load(open(gj))["annotations"], json.load(open(pj))["annotations"]
    cats = {c["id"]: c for c in CATS}
    pqs = []
    for i in range(len(gts)):
        acc = PQAccumulator(CATS)
        acc.add(gts[i][0], gt_anns[i]["segments_info"], preds[i][0], pred_anns[i]["segments_info"])
        with contextlib.redirect_stdout(io.StringIO()):
            st = ref.pq_compute_single_core(0, [(gt_anns[i], copy.deepcopy(pred_anns[i]))], gf, pf, cats)
        for c in cats:
            k = acc.stat.cat_index[c]
            assert (acc.stat.tp[k], acc.stat.fp[k], acc.stat.fn[k]) == (st[c].tp, st[c].fp, st[c].fn), (i, c)
            assert abs(acc.stat.iou[k] - st[c].iou) <= TOL, (i, c)
        pqs.append(acc.summary()["All"]["pq"])
    assert min(pqs) < 0.5 < max(pqs)  # the perturbations really vary the result
    # whole set: file path (1 and 2 workers) and streaming equal the reference
    theirs = reference(gj, gf, pj, pf)
    assert_same(pq_compute_files(gj, pj, gf, pf, workers=1), theirs)
    assert_same(pq_compute_files(gj, pj, gf, pf, workers=2), theirs)
    acc = PQAccumulator({c["id"]: c for c in CATS})
    for (g, gs), (p, ps) in zip(gts, preds):
        acc.add(id_to_bgr(g)[..., ::-1], gs, p.astype(np.int32), ps)  # RGB and int32 inputs
    assert_same(acc.summary(), theirs)
    big = 1 << 40  # ids beyond 24 bits take the searchsorted path, not the lookup table
    acc = PQAccumulator(CATS)
    for (g, gs), (p, ps) in zip(gts, preds):
        acc.add(np.where(g > 0, g + big, 0), [dict(s, id=s["id"] + big) for s in gs],
                np.where(p > 0, p + big, 0), [dict(s, id=s["id"] + big) for s in ps])
    assert_same(acc.summary(), theirs)


def test_crowd_and_void_by_hand():
    """Hand-computed: IoU with void left out of the union, crowd / void FPs ignored."""
    gt = np.zeros((20, 20), np.int64)
    gt[0:10, 0:10] = 5           # thing cat 1, area 100
    gt[10:20, 10:20] = 6         # crowd of cat 1
    gt[0:10, 10:20] = 7          # stuff cat 10
    gt[10:20, 0:10] = 0          # void
    gsegs = [{"id": 5, "category_id": 1, "iscrowd": 0, "area": 100},
             {"id": 6, "category_id": 1, "iscrowd": 1, "area": 100},
             {"id": 7, "category_id": 10, "iscrowd": 0, "area": 100}]
    pred = np.zeros_like(gt)
    pred[0:14, 0:8] = 1          # 80 on thing 5, 32 on void -> IoU 80 / (112 + 100 - 80 - 32) = 0.8
    pred[10:20, 10:20] = 2       # cat 1 on crowd of cat 1 -> ignored
    pred[0:10, 10:20] = 3        # cat 2 on stuff -> FP; stuff 7 -> FN
    pred[14:20, 0:10] = 4        # cat 3 fully on void -> ignored
    psegs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1},
             {"id": 3, "category_id": 2}, {"id": 4, "category_id": 3}]
    acc = PQAccumulator(CATS)
    acc.add(gt, gsegs, pred, psegs)
    r = acc.summary()
    assert r["per_class"][1] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0})
    assert r["per_class"][2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # one FP
    assert r["per_class"][10] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # one FN
    assert r["All"]["n"] == 3 and r["Things"]["n"] == 2 and r["Stuff"]["n"] == 1
    assert r["All"]["pq"] == pytest.approx(0.8 / 3)
    pred2 = pred.copy()
    pred2[10:20, 10:20] = 3      # the cat-2 segment now also covers the cat-1 crowd -> still FP
    acc3 = PQAccumulator(CATS)  # a gt segment of a category outside the list is ignored
    acc3.add(gt, gsegs + [{"id": 8, "category_id": 99, "iscrowd": 0, "area": 0}], pred, psegs)
    assert acc3.summary() == r
    acc2 = PQAccumulator(CATS)
    acc2.add(gt, gsegs, pred2, [psegs[0], psegs[2], psegs[3]])
    assert acc2.stat.fp[acc2.stat.cat_index[2]] == 1


def test_several_same_class_crowds_follow_segments_info_order(tmp_path):
    """Two cat-1 crowd regions: the reference keeps the one listed last in segments_info (not the
    largest id) for the FP test; prediction segments_info order never matters."""
    gt = np.zeros((20, 20), np.int64)
    gt[:10, :10] = 5             # crowd of cat 1
    gt[:10, 10:] = 3             # crowd of cat 1
    gt[10:] = 9                  # stuff cat 10 (so that the reference has a category to average)
    crowd5 = {"id": 5, "category_id": 1, "iscrowd": 1, "area": 100}
    crowd3 = {"id": 3, "category_id": 1, "iscrowd": 1, "area": 100}
    stuff = {"id": 9, "category_id": 10, "iscrowd": 0, "area": 200}
    pred = np.zeros_like(gt)
    pred[:10, 7:] = 7            # cat 1: 30 px on crowd 5, 100 px on crowd 3
    pred[10:] = 8
    psegs = [{"id": 7, "category_id": 1}, {"id": 8, "category_id": 10}]
    cats = {c["id"]: c for c in CATS}
    for k, (gsegs, fp) in enumerate((([crowd5, crowd3, stuff], 0), ([crowd3, crowd5, stuff], 1),
                                     ([stuff, crowd3, crowd5], 1), ([crowd3, stuff, crowd5], 1))):
        for ps in (psegs, psegs[::-1]):
            acc = PQAccumulator(CATS)
            acc.add(gt, gsegs, pred, ps)
            gj, gf = write_dataset(str(tmp_path), f"gt{k}", [(gt, gsegs)], CATS)
            pj, pf = write_dataset(str(tmp_path), f"pred{k}", [(pred, ps)], CATS)
            gt_ann, pred_ann = json.load(open(gj))["annotations"][0], json.load(open(pj))["annotations"][0]
            with contextlib.redirect_stdout(io.StringIO()):
                st = ref.pq_compute_single_core(0, [(gt_ann, pred_ann)], gf, pf, cats)
            assert st[1].fp == fp and acc.stat.fp[acc.stat.cat_index[1]] == fp, (k, [s["id"] for s in gsegs])
            for c in cats:
                i = acc.stat.cat_index[c]
                assert (acc.stat.tp[i], acc.stat.fp[i], acc.stat.fn[i]) == (st[c].tp, st[c].fp, st[c].fn)
            theirs = reference(gj, gf, pj, pf)
            assert_same(acc.summary(), theirs)
            assert_same(pq_compute_files(gj, pj, gf, pf, workers=1), theirs)


def test_bad_predictions_raise_clear_errors(tmp_path):
    gt = np.zeros((8, 8), np.int64)
    gt[:4] = 9
    gsegs = [{"id": 9, "category_id": 10, "iscrowd": 0, "area": 32}]
    pred = gt.copy()
    acc = PQAccumulator(CATS)
    with pytest.raises(DataError, match="presented in PNG and not presented in JSON"):
        acc.add(gt, gsegs, pred, [])
    with pytest.raises(DataError, match="presented in JSON and not presented in PNG"):
        acc.add(gt, gsegs, pred, [{"id": 9, "category_id": 10}, {"id": 4, "category_id": 10}])
    with pytest.raises(DataError, match="unknown category_id 77"):
        acc.add(gt, gsegs, pred, [{"id": 9, "category_id": 77}])
    with pytest.raises(DataError, match="differ in size"):
        acc.add(gt, gsegs, pred[:4], [{"id": 9, "category_id": 10}])
    with pytest.raises(DataError, match="malformed segments_info"):
        acc.add(gt, gsegs, pred, [{"id": 9}])
    with pytest.raises(DataError, match="appears twice"):
        acc.add(gt, gsegs, pred, [{"id": 9, "category_id": 10}] * 2)
    # files: a missing prediction, a missing folder, a malformed JSON, through the CLI
    gj, gf = write_dataset(str(tmp_path), "gt", [(gt, gsegs)] * 2, CATS)
    pj, pf = write_dataset(str(tmp_path), "pred", [(pred, [{"id": 9, "category_id": 10}])], CATS)
    with pytest.raises(DataError, match="no prediction for the image with id: 1"):
        pq_compute_files(gj, pj, gf, pf, workers=1)
    with pytest.raises(DataError, match="doesn't exist"):
        pq_compute_files(gj, pj, gf, str(tmp_path / "nope"), workers=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert pq_main(["--gt-json", gj, "--gt-folder", gf, "--pred-json", str(bad),
                    "--pred-folder", pf]) == 2
    os.remove(os.path.join(pf, "00000.png"))
    with pytest.raises(DataError, match="cannot read panoptic PNG"):
        pq_compute_files(gj, gj, gf, pf, workers=1)


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "pq.json"
    shutil.copytree(os.path.join(SAMPLE, "panoptic"), tmp_path / "pred")
    gj = os.path.join(SAMPLE, "panoptic_examples.json")
    assert pq_main(["--gt-json", gj, "--gt-folder", os.path.join(SAMPLE, "panoptic"),
                    "--pred-json", gj, "--pred-folder", str(tmp_path / "pred"),
                    "--json-out", str(out), "--workers", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["All"]["pq"] == 1.0 and res["per_class"]["1"]["pq"] == 1.0
    assert "All" in capsys.readouterr().out
    assert rgb_to_id(np.array([[[1, 2, 3]]], np.uint8))[0, 0] == 1 + 2 * 256 + 3 * 65536
