"""Whole-process speed of ``sepsnet-pq`` against the COCO panoptic API (panopticapi-lite) and
hotcoco (Rust, ``pip install hotcoco==1.3.0``) on the same files, plus ``sepsnet-pq --boundary``.

Generates ``--n`` COCO-panoptic ground-truth images (``--height`` x ``--width``, default 1024x2048,
~80 segments each: stuff bands, overlapping things, crowd regions (some split into several of one
class), void; segments_info in shuffled order) and perturbed predictions (dropped, relabelled,
shifted, split, merged segments; extra ones), written as PNG + JSON (reused from ``--data-dir`` when
it already holds the same set). ``--png-writer pil`` (default) writes the PNGs as panopticapi does
(PIL: a filter chosen per row: Sub, Up, Paeth...); ``cv2`` as OpenCV does (Sub on every row).
Then, ``--repeats`` rounds, each running every tool once as its own process, one after the other
(so that load from others on a shared machine hits all alike):

- panopticapi: ``pq_compute`` (its own multi-core split over all CPUs);
- hotcoco: ``hotcoco.panoptic.pq_compute`` (Rust threads over all CPUs);
- sepsnet-pq: ``python -m sepsnet.cli.pq --workers W`` (W workers, default all CPUs), with and
  without ``--boundary``; ``sepsnet_fallback``: the same without the C helper
  (``SEPSNET_PQ_NATIVE=0``: NumPy / OpenCV, processes).

Wall time, CPU time (user + sys of the process and its children) and peak resident memory per run;
best (min) and median per tool, the ratios, the machine load, and the largest difference of any
PQ/SQ/RQ number (All, Things, Stuff, per class) against panopticapi. JSON to ``--out``.

    python benchmarks/pq_speed.py --n 200 --repeats 3 --data-dir /tmp/pq_data --out pq_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

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
    cuts = [0, *sorted(rng.choice(np.arange(16, h - 16), 7, replace=False).tolist()), h]
    for a, b in zip(cuts[:-1], cuts[1:]):
        nxt += int(rng.integers(1, 5000))
        gt[a:b] = nxt
        cat_of[nxt] = int(rng.choice(STUFF))
    for _ in range(int(rng.integers(60, 90))):
        nxt += int(rng.integers(1, 5000))
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        ry, rx = int(rng.integers(4, h // 10)), int(rng.integers(4, w // 14))
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


def _write_png(path: str, ids: np.ndarray, writer: str) -> None:
    if writer == "cv2":
        cv2.imwrite(path, _bgr(ids))
    else:
        from PIL import Image

        Image.fromarray(_bgr(ids)[..., ::-1]).save(path)


def write_data(root: str, n: int, h: int, w: int, seed: int, writer: str = "pil") -> None:
    """The image set, unless ``root`` already holds the same one (same n, size, seed and writer)."""
    meta = {"n": n, "height": h, "width": w, "seed": seed, "generator": 2, "png_writer": writer}
    meta_path = os.path.join(root, "meta.json")
    if os.path.isfile(meta_path) and json.load(open(meta_path)) == meta:
        return
    rng = np.random.default_rng(seed)
    for name in ("gt", "pred"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    anns = {"gt": [], "pred": []}
    for i in range(n):
        for name, (ids, segs) in zip(("gt", "pred"), make_pair(rng, h, w)):
            fn = f"{i:06d}.png"
            _write_png(os.path.join(root, name, fn), ids, writer)
            anns[name].append({"image_id": i, "file_name": fn, "segments_info": segs})
    for name in ("gt", "pred"):
        atomic_write_json({"annotations": anns[name], "categories": CATS}, os.path.join(root, f"{name}.json"),
                          indent=None)
    atomic_write_json(meta, meta_path)


# each tool: a whole process that writes {"All", "Things", "Stuff", "per_class"} to argv[-1]
_PANOPTICAPI = """
import contextlib, io, json, sys
from panopticapi.evaluation import pq_compute
with contextlib.redirect_stdout(io.StringIO()):
    r = pq_compute(*sys.argv[1:5])
json.dump(r, open(sys.argv[5], "w"))
"""
_HOTCOCO = """
import contextlib, io, json, sys
from hotcoco.panoptic import pq_compute
with contextlib.redirect_stdout(io.StringIO()):
    r = pq_compute(*sys.argv[1:5])
json.dump(r, open(sys.argv[5], "w"))
"""


def _commands(root: str, workers: int, out: str) -> dict[str, list[str]]:
    """The command line of every tool (``*_before``: the same CLI, run from ``--before``)."""
    files = [os.path.join(root, "gt.json"), os.path.join(root, "pred.json"), os.path.join(root, "gt"),
             os.path.join(root, "pred")]
    ours = [sys.executable, "-m", "sepsnet.cli.pq", "--gt-json", files[0], "--pred-json", files[1],
            "--gt-folder", files[2], "--pred-folder", files[3], "--workers", str(workers), "--json-out"]
    return {"panopticapi": [sys.executable, "-c", _PANOPTICAPI, *files, out],
            "hotcoco": [sys.executable, "-c", _HOTCOCO, *files, out],
            "sepsnet": [*ours, out], "sepsnet_before": [*ours, out], "sepsnet_fallback": [*ours, out],
            "sepsnet_boundary": [*ours, out, "--boundary"], "sepsnet_boundary_before": [*ours, out, "--boundary"]}


# runs argv[2:] and writes its wall s, CPU s and peak resident MB to argv[1]. A small process of its own: a
# child forked straight from this (large) benchmark process would report this process's memory as its peak.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"rc": rc, "wall": wall, "cpu": r.ru_utime + r.ru_stime, "peak_mb": r.ru_maxrss / 1024},
          open(sys.argv[1], "w"))
"""


def _run(cmd: list[str], cwd: str, pythonpath: str | None = None, env_extra: dict | None = None
         ) -> tuple[float, float, float]:
    """(wall s, CPU s, peak resident MB) of the command and its children; ``pythonpath`` replaces
    PYTHONPATH. Run in ``cwd`` (not the repository root, whose sepsnet ``python -m`` would put first
    on the path)."""
    env = dict(os.environ, **(env_extra or {}))
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    report = os.path.join(cwd, "measure.json")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, report, *cmd], stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd)
    m = json.load(open(report)) if proc.returncode == 0 else {"rc": proc.returncode}
    if m["rc"] != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    return m["wall"], m["cpu"], m["peak_mb"]


def max_diff(a: dict, b: dict) -> float:
    """Largest |difference| of PQ/SQ/RQ (All, Things, Stuff, and per class where both have it)."""
    d = max(abs(a[n][k] - b[n][k]) for n in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq"))
    pa, pb = a.get("per_class") or {}, b.get("per_class") or {}
    common = set(map(str, pa)) & set(map(str, pb))
    pa, pb = {str(k): v for k, v in pa.items()}, {str(k): v for k, v in pb.items()}
    return max([d] + [abs(pa[c][k] - pb[c][k]) for c in common for k in ("pq", "sq", "rq")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sepsnet-pq --workers")
    p.add_argument("--repeats", type=int, default=3, help="rounds; best (min) and median reported")
    p.add_argument("--tools", default="panopticapi,hotcoco,sepsnet,sepsnet_boundary",
                   help="comma-separated; also sepsnet_fallback (without the C helper)")
    p.add_argument("--png-writer", choices=("pil", "cv2"), default="pil",
                   help="who writes the generated PNGs: PIL as panopticapi (default) or OpenCV")
    p.add_argument("--before", default=None,
                   help="a checkout of an older sepsnet (its root folder): also time its sepsnet-pq "
                        "(tools sepsnet_before, sepsnet_boundary_before) in the same rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="keep / reuse the generated data here (default: temp)")
    p.add_argument("--out", default="pq_speed.json")
    args = p.parse_args()
    if args.data_dir:
        args.data_dir = os.path.abspath(args.data_dir)
    # the sepsnet under test is this checkout's (also when it is not installed)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])
    tools = args.tools.split(",")
    if args.before:
        tools += [f"{t}_before" for t in tools if t in ("sepsnet", "sepsnet_boundary")]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or tmp
        t0 = time.perf_counter()
        write_data(root, args.n, args.height, args.width, args.seed, args.png_writer)
        print(f"data: {args.n} images {args.height}x{args.width} in {root} ({time.perf_counter() - t0:.1f} s)")
        outs = {t: os.path.join(tmp, f"{t}.json") for t in tools}
        runs: dict[str, dict[str, list[float]]] = {t: {"wall": [], "cpu": [], "peak_mb": []} for t in tools}
        load = [os.getloadavg()[0]]
        for r in range(args.repeats):
            for tool in tools:  # alternated: every round runs each tool once
                path = os.path.abspath(args.before) if tool.endswith("_before") else None
                env = {"SEPSNET_PQ_NATIVE": "0"} if tool == "sepsnet_fallback" else None
                wall, cpu, peak = _run(_commands(root, args.workers, outs[tool])[tool], tmp, path, env)
                runs[tool]["wall"].append(wall)
                runs[tool]["cpu"].append(cpu)
                runs[tool]["peak_mb"].append(peak)
            load.append(os.getloadavg()[0])
            print(f"round {r + 1}: " + ", ".join(f"{t} {runs[t]['wall'][-1]:.2f} s" for t in tools)
                  + f" (load {load[-1]:.1f})")
        results = {t: json.load(open(outs[t])) for t in tools}
    ref = results.get("panopticapi")
    rows = {}
    for tool in tools:
        best = {k: min(v) for k, v in runs[tool].items()}
        med = {k: statistics.median(v) for k, v in runs[tool].items()}
        rows[tool] = {"wall_s": best["wall"], "cpu_s": best["cpu"], "wall_median_s": med["wall"],
                      "cpu_median_s": med["cpu"], "cpu_ms_per_image": 1000 * best["cpu"] / args.n,
                      "peak_mb": max(runs[tool]["peak_mb"]), "runs": runs[tool]}
        if ref is not None and not tool.startswith("sepsnet_boundary"):
            rows[tool]["max_abs_diff_vs_panopticapi"] = max_diff(results[tool], ref)
    ratios = {}
    for a, b in (("sepsnet", "hotcoco"), ("sepsnet", "panopticapi"), ("hotcoco", "panopticapi"),
                 ("sepsnet_boundary", "hotcoco"), ("sepsnet_boundary", "sepsnet"),
                 ("sepsnet_before", "sepsnet"), ("sepsnet_boundary_before", "sepsnet_boundary"),
                 ("sepsnet_before", "hotcoco"), ("sepsnet_fallback", "sepsnet"), ("sepsnet_fallback", "hotcoco")):
        if a in rows and b in rows:
            ratios[f"{a}/{b}"] = {k: rows[a][k] / rows[b][k] for k in ("wall_s", "cpu_s", "wall_median_s")}
    for tool, r in rows.items():
        diff = r.get("max_abs_diff_vs_panopticapi")
        print(f"{tool:24s} wall {r['wall_s']:6.2f} s (median {r['wall_median_s']:6.2f})  cpu {r['cpu_s']:6.2f} s "
              f"({r['cpu_ms_per_image']:.1f} ms/img)  peak {r['peak_mb']:.0f} MB"
              + ("" if diff is None else f"  max|diff| {diff:.1e}"))
    for name, v in ratios.items():
        print(f"{name:28s} wall x{v['wall_s']:.2f} (median x{v['wall_median_s']:.2f})  cpu x{v['cpu_s']:.2f}")
    if "sepsnet_boundary" in results:
        b = results["sepsnet_boundary"]["boundary"]
        print(f"Boundary PQ {100 * b['All']['pq']:.2f} (mask PQ {100 * results['sepsnet_boundary']['All']['pq']:.2f})")
        if "sepsnet_boundary_before" in results:
            rows["sepsnet_boundary"]["boundary_max_abs_diff_vs_before"] = max_diff(
                b, results["sepsnet_boundary_before"]["boundary"])
            print(f"Boundary PQ max|diff| vs before {rows['sepsnet_boundary']['boundary_max_abs_diff_vs_before']:.1e}")
    result = {"n": args.n, "height": args.height, "width": args.width, "repeats": args.repeats,
              "png_writer": args.png_writer,
              "workers": args.workers, "cpu_count": os.cpu_count(), "loadavg_1min": load,
              "machine": platform.platform(), "processor": platform.processor(), "tools": rows, "ratios": ratios}
    atomic_write_json(result, args.out)
    print(f"load (1 min) {', '.join(f'{v:.1f}' for v in load)}; wrote {args.out}")


if __name__ == "__main__":
    main()
