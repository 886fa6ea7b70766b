"""Boundary IoU / Boundary PQ: the all-segments-at-once band equals per-segment erosion, and the
vectorised Boundary PQ equals a per-pair loop written from the definition (Cheng et al. 2021)."""
from __future__ import annotations

import json
from collections import defaultdict

import cv2
import numpy as np
import pytest
from test_pq import CATS, make_gt, perturb, segments_from, write_dataset

from sepsnet.cli.pq import main as pq_main
from sepsnet.eval.boundary import boundary_band, boundary_width
from sepsnet.eval.pq import PQAccumulator, pq_compute_files


def band_by_erosion(mask: np.ndarray, d: int) -> np.ndarray:
    """One segment: mask minus d erosions by 3x3, the image border counting as background."""
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def loop_stats(gt, gsegs, pred, psegs, cats, ratio):
    """Per-category (tp, fp, fn, iou) by looping over pairs; ``ratio=None`` is plain PQ."""
    d = boundary_width(*gt.shape, ratio) if ratio else 0
    stats = defaultdict(lambda: [0, 0, 0, 0.0])
    parea = {s["id"]: int((pred == s["id"]).sum()) for s in psegs}
    g_matched, p_matched = set(), set()
    for g in gsegs:
        if g["iscrowd"]:
            continue
        gm = gt == g["id"]
        for p in psegs:
            pm = pred == p["id"]
            inter = int((gm & pm).sum())
            if p["category_id"] != g["category_id"] or inter == 0:
                continue
            iou = inter / (parea[p["id"]] + g["area"] - inter - int((pm & (gt == 0)).sum()))
            if ratio:
                gb, pb = band_by_erosion(gm, d), band_by_erosion(pm, d)
                bi = int((gb & pb).sum())
                iou = min(iou, bi / (int(gb.sum()) + int(pb.sum()) - bi - int((pb & (gt == 0)).sum())))
            if iou > 0.5:
                st = stats[g["category_id"]]
                st[0] += 1
                st[3] += iou
                g_matched.add(g["id"])
                p_matched.add(p["id"])
    crowd = {}
    for g in gsegs:
        if g["id"] in g_matched:
            continue
        if g["iscrowd"]:
            crowd[g["category_id"]] = g["id"]
        else:
            stats[g["category_id"]][2] += 1
    for p in psegs:
        if p["id"] in p_matched:
            continue
        pm = pred == p["id"]
        ign = int((pm & (gt == 0)).sum())
        if p["category_id"] in crowd:
            ign += int((pm & (gt == crowd[p["category_id"]])).sum())
        if ign / parea[p["id"]] <= 0.5:
            stats[p["category_id"]][1] += 1
    return stats


@pytest.mark.parametrize("d", [1, 2, 5, 40])
def test_band_equals_per_segment_erosion(d: int, pq_path: str) -> None:
    rng = np.random.default_rng(d)
    for _ in range(20):
        ids, segs = make_gt(rng)
        band = boundary_band(ids, d)
        for s in segs:
            m = ids == s["id"]
            np.testing.assert_array_equal(band & m, band_by_erosion(m, d))
        big = np.where(ids > 0, ids + (1 << 40), 0)  # ids beyond float32's exact range
        np.testing.assert_array_equal(boundary_band(big, d), band)
        np.testing.assert_array_equal(boundary_band(ids.astype(np.uint32), d), band)


def test_compiled_band_equals_opencv_dilation(monkeypatch) -> None:
    """The C helper's band (row runs, column counts) against the fallback's cv2.dilate, on maps
    larger than the window with widths around the block size."""
    from sepsnet.eval import pq_native

    if pq_native.NATIVE is None:
        pytest.skip("C helper sepsnet.eval._pq_native not built (pip install -e . builds it) or SEPSNET_PQ_NATIVE=0")
    rng = np.random.default_rng(9)
    maps = [make_gt(rng, 150, 173)[0] for _ in range(4)]
    maps.append(rng.integers(0, 3, (60, 71)))  # noise: edges everywhere
    for d in (1, 2, 3, 7, 16, 31):
        native = [boundary_band(m.astype(np.uint32), d) for m in maps]
        with monkeypatch.context() as m:
            m.setattr(pq_native, "NATIVE", None)
            for ids, band in zip(maps, native):
                np.testing.assert_array_equal(band, boundary_band(ids, d))


def test_band_by_hand(pq_path: str) -> None:
    ids = np.zeros((7, 7), np.int32)
    ids[1:6, 1:6] = 5
    band = boundary_band(ids, 1)
    inner = np.zeros((7, 7), bool)
    inner[2:5, 2:5] = True
    assert band[1:6, 1:6].sum() == 25 - 9 and not (band & inner & (ids == 5)).any()
    assert boundary_band(np.full((4, 4), 3), 1)[1:3, 1:3].sum() == 0  # image border is a boundary
    assert boundary_band(np.full((4, 4), 3), 1).sum() == 12
    assert boundary_width(100, 100) == 3 and boundary_width(1024, 2048) == 46 and boundary_width(5, 5) == 1


def test_boundary_pq_equals_pair_loop(pq_path: str) -> None:
    rng = np.random.default_rng(3)
    cats = {c["id"]: c for c in CATS}
    cat_ids, thing_ids = list(cats), [1, 2, 3]
    stricter = 0
    for i in range(60):
        gt, gsegs = make_gt(rng)
        pred, psegs = perturb(rng, gt, gsegs, cat_ids, thing_ids)
        for ratio in (None, 0.02, 0.05):
            acc = PQAccumulator(CATS, dilation_ratio=ratio)
            acc.add(gt, gsegs, pred, psegs)
            want = loop_stats(gt, gsegs, pred, psegs, cats, ratio)
            for c in cats:
                k = acc.stat.cat_index[c]
                tp, fp, fn, iou = want[c] if c in want else (0, 0, 0, 0.0)
                assert (acc.stat.tp[k], acc.stat.fp[k], acc.stat.fn[k]) == (tp, fp, fn), (i, ratio, c)
                assert abs(acc.stat.iou[k] - iou) < 1e-9, (i, ratio, c)
        plain = PQAccumulator(CATS)
        plain.add(gt, gsegs, pred, psegs)
        stricter += acc.summary()["All"]["pq"] < plain.summary()["All"]["pq"] - 1e-9
    assert stricter > 10  # boundary PQ really differs from mask PQ on these cases


def test_shifted_square_fails_boundary_but_not_mask() -> None:
    gt = np.full((100, 100), 1, np.int32)  # stuff background (no void: it would leave the union)
    gt[30:70, 30:70] = 7
    pred = np.full_like(gt, 2)
    pred[30:70, 34:74] = 9  # shifted by 4 px > band width 3: mask IoU 0.82, boundary IoU < 0.5
    cats = [{"id": 1, "name": "t", "isthing": 1}, {"id": 10, "name": "s", "isthing": 0}]
    gsegs = segments_from(gt, {7: 1, 1: 10})
    psegs = segments_from(pred, {9: 1, 2: 10})
    mask, boundary = PQAccumulator(cats), PQAccumulator(cats, dilation_ratio=0.02)
    for acc in (mask, boundary):
        acc.add(gt, gsegs, pred, psegs)
    assert mask.summary()["Things"]["pq"] == pytest.approx(1440 / 1760)
    assert boundary.summary()["Things"]["pq"] == 0.0
    assert boundary.stat.fn[0] == 1 and boundary.stat.fp[0] == 1
    same = PQAccumulator(cats, dilation_ratio=0.02)
    same.add(gt, gsegs, gt, gsegs)
    assert same.summary()["All"]["pq"] == 1.0


def test_cli_boundary(tmp_path) -> None:
    rng = np.random.default_rng(5)
    gts = [make_gt(rng) for _ in range(6)]
    preds = [perturb(rng, g, s, [c["id"] for c in CATS], [1, 2, 3]) for g, s in gts]
    gj, gf = write_dataset(str(tmp_path), "gt", gts, CATS)
    pj, pf = write_dataset(str(tmp_path), "pred", preds, CATS)
    out = tmp_path / "pq.json"
    assert pq_main(["--gt-json", gj, "--gt-folder", gf, "--pred-json", pj, "--pred-folder", pf, "--workers", "1",
                    "--boundary", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    direct = pq_compute_files(gj, pj, gf, pf, workers=2, dilation_ratio=0.02)
    assert data["boundary"]["All"]["pq"] == pytest.approx(direct["All"]["pq"], abs=1e-12)
    assert data["boundary"]["All"]["pq"] <= data["All"]["pq"] + 1e-12
    assert pq_main(["--gt-json", gj, "--pred-json", pj, "--gt-folder", gf, "--pred-folder", pf,
                    "--boundary", "--dilation-ratio", "2"]) == 2
