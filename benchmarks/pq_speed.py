"""Time sepsnet's PQ evaluator against the COCO panoptic API (panopticapi-lite) on the same files.

Generates ``--n`` COCO-panoptic ground-truth images (``--height`` x ``--width``: stuff bands,
overlapping things, crowd regions (some split into several of one class), void; segments_info
in shuffled order) and perturbed predictions (dropped, relabelled, shifted,
split, merged segments; extra segments in void / crowd), writes them as PNG + JSON, then times
(a) both with ``--workers`` processes (the reference: its own ``pq_compute`` multi-core split with
that many processes) and (b) both in one process, interleaved, best of ``--repeats`` (the machine
may be shared). Reports the largest difference of any number, prints the ratios, writes JSON (``--out``).

    python benchmarks/pq_speed.py --n 200 --height 512 --width 1024 --workers 2 --out pq_speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import cv2
import numpy as np
from panopticapi import evaluation as ref

from sepsnet.eval.pq import pq_compute_files
from sepsnet.fileio import atomic_write_json

CATS = [{"id": i, "name": f"thing{i}", "isthing": 1} for i in range(1, 9)] + \
       [{"id": i, "name": f"stuff{i}", "isthing": 0} for i in range(20, 31)]
THINGS = [c["id"] for c in CATS if c["isthing"]]
STUFF = [c["id"] for c in CATS if not c["isthing"]]


def _bgr(ids: np.ndarray) -> np.ndarray:
    return np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], -1).astype(np.uint8)


def _segments(ids: np.ndarray, cat_of: dict, crowd: set) -> list:
    labels, counts = np.unique(ids, return_counts=True)
    return [{"id": int(l), "category_id": cat_of[int(l)], "iscrowd": int(int(l) in crowd),
             "area": int(c)} for l, c in zip(labels, counts) if l != 0]


def make_pair(rng: np.random.Generator, h: int, w: int) -> tuple:
    """One ground truth and one perturbed prediction (id maps + segments_info)."""
    gt = np.zeros((h, w), np.int64)
    cat_of, crowd, nxt = {}, set(), int(rng.integers(1, 1000))
    cuts = [0, *sorted(rng.choice(np.arange(16, h - 16), 4, replace=False).tolist()), h]
    for a, b in zip(cuts[:-1], cuts[1:]):
        nxt += int(rng.integers(1, 5000))
        gt[a:b] = nxt
        cat_of[nxt] = int(rng.choice(STUFF))
    for _ in range(int(rng.integers(10, 40))):
        nxt += int(rng.integers(1, 5000))
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        ry, rx = int(rng.integers(4, h // 6)), int(rng.integers(4, w // 8))
        if rng.random() < 0.5:
            gt[max(0, y - ry):y + ry, max(0, x - rx):x + rx] = nxt
        else:
            m = np.zeros((h, w), np.uint8)
            cv2.ellipse(m, (x, y), (rx, ry), float(rng.integers(0, 180)), 0, 360, 1, -1)
            gt[m > 0] = nxt
        cat_of[nxt] = int(rng.choice(THINGS))
        if rng.random() < 0.1:
            crowd.add(nxt)
    if rng.random() < 0.4:  # several adjacent crowd regions of one class (the reference keeps the last listed)
        c = int(rng.choice(THINGS))
        y, x = int(rng.integers(0, h - h // 4)), int(rng.integers(0, w - w // 4))
        hh, ww = int(rng.integers(8, h // 4)), int(rng.integers(16, w // 4))
        edges = np.linspace(x, x + ww, int(rng.integers(2, 5)) + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            nxt += int(rng.integers(1, 5000))
            gt[y:y + hh, a:b] = nxt
            cat_of[nxt] = c
            crowd.add(nxt)
    for _ in range(int(rng.integers(1, 6))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        gt[y:y + int(rng.integers(4, h // 5)), x:x + int(rng.integers(4, w // 5))] = 0
    gt_segs = _segments(gt, cat_of, crowd)
    rng.shuffle(gt_segs)  # segments_info order is not id order

    pred = np.zeros_like(gt)
    pcat, pid = {}, int(rng.integers(1, 10 ** 6))
    for s in gt_segs:
        m, cat, op = gt == s["id"], s["category_id"], rng.random()
        if op < 0.08:
            continue
        if op < 0.15:
            cat = int(rng.choice(THINGS + STUFF))
        elif op < 0.3:
            m = np.roll(m, (int(rng.integers(-h // 20, h // 20)), int(rng.integers(-w // 20, w // 20))), (0, 1))
        elif op < 0.38 and pcat:
            pred[m] = int(rng.choice(list(pcat)))
            continue
        elif op < 0.46:
            cut = int(np.median(np.nonzero(m.any(0))[0]))
            pid += int(rng.integers(1, 999))
            pred[m & (np.arange(w)[None, :] > cut)] = pid
            pcat[pid] = cat
            m = m & (np.arange(w)[None, :] <= cut)
        pid += int(rng.integers(1, 999))
        pred[m] = pid
        pcat[pid] = cat
    for _ in range(int(rng.integers(1, 6))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        pid += int(rng.integers(1, 999))
        pred[y:y + int(rng.integers(4, h // 8)), x:x + int(rng.integers(4, w // 8))] = pid
        pcat[pid] = int(rng.choice(THINGS + STUFF))
    pred_segs = [{"id": s["id"], "category_id": s["category_id"]} for s in _segments(pred, pcat, set())]
    rng.shuffle(pred_segs)
    return (gt, gt_segs), (pred, pred_segs)


def write_data(root: str, n: int, h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    paths = {}
    for name in ("gt", "pred"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    anns = {"gt": [], "pred": []}
    for i in range(n):
        for name, (ids, segs) in zip(("gt", "pred"), make_pair(rng, h, w)):
            fn = f"{i:06d}.png"
            cv2.imwrite(os.path.join(root, name, fn), _bgr(ids))
            anns[name].append({"image_id": i, "file_name": fn, "segments_info": segs})
    for name in ("gt", "pred"):
        paths[name] = os.path.join(root, f"{name}.json")
        atomic_write_json({"annotations": anns[name], "categories": CATS}, paths[name], indent=None)
    return paths


def reference_run(root: str, workers: int) -> dict:
    """The reference API: its multi-core split over ``workers`` processes, or one process."""
    gt_json, pred_json = os.path.join(root, "gt.json"), os.path.join(root, "pred.json")
    with contextlib.redirect_stdout(io.StringIO()):
        if workers == multiprocessing.cpu_count():
            return ref.pq_compute(gt_json, pred_json, os.path.join(root, "gt"), os.path.join(root, "pred"))
        gt, pred = json.load(open(gt_json)), json.load(open(pred_json))
        cats = {c["id"]: c for c in gt["categories"]}
        preds = {a["image_id"]: a for a in pred["annotations"]}
        pairs = [(g, preds[g["image_id"]]) for g in gt["annotations"]]
        args = (os.path.join(root, "gt"), os.path.join(root, "pred"), cats)
        if workers == 1:
            stat = ref.pq_compute_single_core(0, pairs, *args)
        else:
            stat = ref.PQStat()
            with multiprocessing.Pool(workers) as pool:
                parts = [pool.apply_async(ref.pq_compute_single_core, (i, chunk, *args))
                         for i, chunk in enumerate(np.array_split(pairs, workers))]
                for p in parts:
                    stat += p.get()
        out = {}
        for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            out[name], per = stat.pq_average(cats, isthing)
            if name == "All":
                out["per_class"] = per
        return out


def max_diff(a: dict, b: dict) -> float:
    d = max(abs(a[n][k] - b[n][k]) for n in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq"))
    return max(d, max(abs(a["per_class"][c][k] - v[k]) for c, v in b["per_class"].items() for k in v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
    p.add_argument("--repeats", type=int, default=3, help="timed runs each; best (min) and median reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="keep the generated data here (default: temp)")
    p.add_argument("--out", default="pq_speed.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        t0 = time.perf_counter()
        write_data(root, args.n, args.height, args.width, args.seed)
        print(f"generated {args.n} images {args.height}x{args.width} in {time.perf_counter() - t0:.1f} s")
        gt_json, pred_json = os.path.join(root, "gt.json"), os.path.join(root, "pred.json")
        rows = {}
        for w in sorted({1, args.workers}):
            times = {"sepsnet": [], "reference": []}
            for _ in range(args.repeats):  # interleaved so machine load hits both alike
                t = time.perf_counter()
                ours = pq_compute_files(gt_json, pred_json, os.path.join(root, "gt"),
                                        os.path.join(root, "pred"), workers=w)
                times["sepsnet"].append(time.perf_counter() - t)
                t = time.perf_counter()
                theirs = reference_run(root, w)
                times["reference"].append(time.perf_counter() - t)
            best = {k: min(v) for k, v in times.items()}
            med = {k: statistics.median(v) for k, v in times.items()}
            rows[f"workers={w}"] = {
                "sepsnet_s": best["sepsnet"], "reference_s": best["reference"],
                "speedup": best["reference"] / best["sepsnet"],
                "speedup_median": med["reference"] / med["sepsnet"], "max_abs_diff": max_diff(ours, theirs),
                "sepsnet_ms_per_image": 1000 * best["sepsnet"] / args.n,
                "reference_ms_per_image": 1000 * best["reference"] / args.n, "runs": times}
            r = rows[f"workers={w}"]
            print(f"workers={w}: sepsnet {r['sepsnet_s']:.2f} s ({r['sepsnet_ms_per_image']:.1f} ms/img), "
                  f"reference {r['reference_s']:.2f} s ({r['reference_ms_per_image']:.1f} ms/img), "
                  f"speedup x{r['speedup']:.2f} (median x{r['speedup_median']:.2f}), "
                  f"max |diff| {r['max_abs_diff']:.1e}, PQ {100 * ours['All']['pq']:.2f}")
    result = {"n": args.n, "height": args.height, "width": args.width, "repeats": args.repeats,
              "cpu_count": os.cpu_count(), "machine": platform.platform(),
              "processor": platform.processor(), "results": rows}
    atomic_write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
