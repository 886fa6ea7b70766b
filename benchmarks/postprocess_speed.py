"""Time each post-processing stage for N instances at 1024x2048 (default: CPU).

Synthetic dense outputs shaped like a Cityscapes model (8 thing, 11 stuff classes, K=4, M=14),
a stand-in instance engine returning blob-shaped 56x56 probabilities, then
``sepsnet.postprocess.pipeline.panoptic_inference``. Prints and saves JSON (``--out``) with the
median seconds per stage over ``--repeats`` runs.

Unless ``--no-reference``, it also times the SE-PSNet R-50 model itself at the same size
(configs/coco_r101.yaml with a ResNet-50 backbone and the Cityscapes class counts, random
weights, deploy mode): ``forward_dense`` on one image and ``forward_instances`` on
``--instances`` boxes. The end-to-end CPU time is dense + instances + post-processing, and the
report says whether post-processing stays under the 10% target of that.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sepsnet.config import SEPSNetConfig, load_config
from sepsnet.fileio import atomic_write_json
from sepsnet.model.fcos_head import compute_locations
from sepsnet.postprocess.candidates import level_sizes
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.timing import StageTimer


def stuff_logits(kind: str, classes: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(1, classes, h, w) stand-in stuff logits. ``regions``: large smooth regions (a coarse random
    field's argmax) with a clear lead of 4 for the region's class and noise of std 0.5, the shape of a
    trained stuff head's output; ``blobs``: box-filtered noise of near-equal classes whose argmax
    changes between about a fifth of neighbouring cells (a pessimistic case for the stuff pass)."""
    if kind == "regions":
        coarse = torch.nn.functional.interpolate(torch.randn(1, classes, 6, 12, generator=g), size=(h, w),
                                                 mode="bilinear")
        lead = torch.nn.functional.one_hot(coarse[0].argmax(0), classes).permute(2, 0, 1)[None].float() * 4
        return lead + torch.randn(1, classes, h, w, generator=g) * 0.5
    return torch.nn.functional.avg_pool2d(torch.randn(1, classes, h, w, generator=g), 31, 1, 15) * 10


def make_dense(h: int, w: int, num_instances: int, device: str, seed: int = 0, stuff: str = "blobs") -> dict:
    g = torch.Generator().manual_seed(seed)
    t, s, k, m = 8, 11, 4, 14
    sizes = level_sizes((h // 8, w // 8), 5)
    level_strides = [8 * 2 ** lvl for lvl in range(len(sizes))]
    loc = torch.cat(compute_locations([torch.empty(hw) for hw in sizes], level_strides))
    stride = torch.cat([torch.full((h * w,), float(st)) for (h, w), st in zip(sizes, level_strides)])
    num_loc = loc.shape[0]
    ext = (torch.rand(num_loc, 4, generator=g) * 4 + 1) * stride[:, None] * 2  # l, t, r, b
    boxes = torch.cat([loc - ext[:, :2], loc + ext[:, 2:]], 1)
    scores = torch.rand(num_loc, t, generator=g) * 0.06  # background: many above 0.05
    hot = torch.randperm(num_loc, generator=g)[: int(num_instances * 1.5)]
    scores[hot, torch.randint(0, t, (hot.numel(),), generator=g)] = 0.5 + 0.5 * torch.rand(hot.numel(), generator=g)
    stuff_map = stuff_logits(stuff, s + 1, h // 4, w // 4, g)
    dense = {
        "boxes": boxes[None], "scores": scores[None], "centerness": 0.5 + 0.5 * torch.rand(1, num_loc, generator=g),
        "attention": torch.randn(1, num_loc, k * m * m, generator=g),
        "bases": torch.randn(1, k + 1, h // 4, w // 4, generator=g),
        "p3": torch.randn(1, 16, h // 8, w // 8, generator=g), "stuff_logits": stuff_map,
    }
    return {key: v.to(device) for key, v in dense.items()}


def blob_instances(bases, p3, rois, attention):
    """Stand-in instance engine: an ellipse-like probability blob per instance."""
    n, r = rois.shape[0], 56
    c = (torch.arange(r, device=rois.device, dtype=torch.float32) + 0.5) / r * 2 - 1
    d = c[None, :, None] ** 2 + c[None, None, :] ** 2
    probs = torch.sigmoid((1.0 - d.expand(n, r, r)) * 8)
    sc = torch.linspace(0.3, 0.9, n, device=rois.device)
    return {"mask_probs": probs, "iou_score": sc, "silhouette_score": sc.flip(0)}


def time_r50_model(h: int, w: int, num_instances: int, repeats: int) -> dict:
    """Median CPU seconds of the SE-PSNet R-50 deploy model: dense graph and instance graph."""
    from sepsnet.model.sepsnet import SEPSNet

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco_r101.yaml")
    cfg.model.backbone.name = "resnet50"
    cfg.model.num_thing_classes, cfg.model.num_stuff_classes = 8, 11
    torch.manual_seed(0)
    model = SEPSNet(cfg.model, deploy=True).eval()
    x = torch.randn(1, 3, -(-h // 32) * 32, -(-w // 32) * 32)
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(num_instances, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(num_instances, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2]) + 16
    rois = torch.cat([torch.zeros(num_instances, 1), xy, xy + wh], 1)
    dense_t, inst_t = [], []
    with torch.inference_mode():
        for i in range(repeats + 1):  # first run is the warm-up
            t0 = time.perf_counter()
            dense = model.forward_dense(x)
            t1 = time.perf_counter()
            attention = dense["attention"][0, :num_instances]
            model.forward_instances(dense["bases"], dense["p3"], rois, attention)
            t2 = time.perf_counter()
            if i:
                dense_t.append(t1 - t0)
                inst_t.append(t2 - t1)
    return {"config": "coco_r101.yaml with resnet50, 8 thing / 11 stuff classes", "input_hw": list(x.shape[-2:]),
            "dense_seconds": round(statistics.median(dense_t), 4),
            "instances_seconds": round(statistics.median(inst_t), 4), "repeats": repeats}


def ab_compare(a: argparse.Namespace) -> int:
    """Alternate fresh processes of this script on ``--ab-against`` and on this tree (load drift
    hits both alike); per stage the median over rounds of each process's median."""
    import subprocess
    import tempfile

    here = Path(__file__).resolve()
    trees = {"before": str(Path(a.ab_against).resolve()), "after": str(here.parents[1])}
    got: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for name, src in trees.items():
                out = Path(tmp) / f"{name}{r}.json"
                cmd = [sys.executable, str(here), "--no-reference", "--repeats", str(a.repeats), "--height",
                       str(a.height), "--width", str(a.width), "--instances", str(a.instances), "--out", str(out)]
                cmd += ["--threads", str(a.threads)] if a.threads else []
                cmd += ["--stuff-logits", a.stuff_logits] if a.stuff_logits != "blobs" else []
                env = {**os.environ, "PYTHONPATH": src}
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                got[name].append(json.loads(out.read_text())["median_seconds"])
    report: dict = {"size": [a.height, a.width], "instances": a.instances, "rounds": a.rounds,
                    "repeats_per_round": a.repeats, "torch_threads": torch.get_num_threads(), "trees": trees}
    for name, runs in got.items():
        report[name] = {k: round(statistics.median(r[k] for r in runs), 5) for k in runs[0]}
    b, f = report["before"]["postprocess_excl_instance_engine"], report["after"]["postprocess_excl_instance_engine"]
    report["speedup_excl_instance_engine"] = round(b / f, 2)
    report["cpu_seconds_ratio"] = round(report["before"]["cpu"] / report["after"]["cpu"], 2)
    print(json.dumps(report, indent=2))
    if a.out:
        atomic_write_json(report, a.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-reference", action="store_true",
                   help="skip timing the SE-PSNet R-50 model (the 10%% target needs it)")
    p.add_argument("--reference-repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--compare-before", action="store_true",
                   help="also time the pre-issue-13 implementation (tests/_reference_postprocess.py) side by side")
    p.add_argument("--ab-against", default=None, metavar="SRC",
                   help="A/B in one run: a directory holding another version of the sepsnet package (e.g. "
                        "`git archive REV sepsnet | tar -x -C DIR`); this script runs in fresh processes for it "
                        "and for this tree, alternately, --rounds times, and reports the medians of both")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice, 2 on the project machine)")
    p.add_argument("--stuff-logits", choices=("blobs", "regions"), default="blobs",
                   help="stand-in stuff head output: blobs (near-equal classes, fragmented argmax; pessimistic) "
                        "or regions (large regions with a clear lead, like a trained head)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ab_against:
        return ab_compare(a)
    cfg = SEPSNetConfig()
    cfg.postprocess.max_instances = a.instances
    dense = make_dense(a.height, a.width, a.instances, a.device, stuff=a.stuff_logits)
    sizes = [((a.height, a.width), (a.height, a.width))]

    def timed_run() -> tuple:
        timer = StageTimer(enabled=True, device=a.device)
        t0, c0 = time.perf_counter(), time.process_time()
        (res,) = panoptic_inference(dense, blob_instances, sizes, cfg, timer=timer)
        return res, {**res.timings, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}

    timed_run()  # warm-up
    runs = []
    for _ in range(a.repeats):
        res, t = timed_run()
        runs.append(t)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["postprocess_excl_instance_engine"] = med["wall"] - med["instances"]
    before = None
    if a.compare_before:  # the pre-issue-13 implementation (tests/_reference_postprocess.py), same inputs
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import _reference_postprocess as old

        (ref,) = old.panoptic_inference(dense, blob_instances, sizes, cfg)  # warm-up
        same = bool(torch.equal(ref.id_map.cpu(), res.id_map.cpu()) and ref.segments_info == res.segments_info)
        walls = []
        for _ in range(a.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            (ref,) = old.panoptic_inference(dense, blob_instances, sizes, cfg)
            walls.append({**ref.timings, "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
        bmed = {k: statistics.median(r[k] for r in walls) for k in walls[0]}
        bpost = bmed["wall"] - bmed["instances"]
        before = {"median_seconds": {k: round(v, 5) for k, v in bmed.items()},
                  "postprocess_excl_instance_engine": round(bpost, 5), "identical_output": same,
                  "speedup": round(bpost / med["postprocess_excl_instance_engine"], 2),
                  "cpu_seconds_ratio": round(bmed["cpu"] / med["cpu"], 2)}
    report = {
        "size": [a.height, a.width], "device": a.device, "torch_threads": torch.get_num_threads(),
        "stuff_logits": a.stuff_logits,
        "instances_kept": res.num_instances, "segments": len(res.segments_info), "repeats": a.repeats,
        "median_seconds": {k: round(v, 5) for k, v in med.items()},
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }
    if before is not None:
        report["before_issue13"] = before
    if not a.no_reference:
        ref = time_r50_model(a.height, a.width, a.instances, a.reference_repeats)
        post = med["postprocess_excl_instance_engine"]
        e2e = ref["dense_seconds"] + ref["instances_seconds"] + post
        report["r50_model"] = ref
        report["end_to_end_seconds"] = round(e2e, 4)
        report["postprocess_fraction_of_end_to_end"] = round(post / e2e, 4)
        report["meets_10pct_target"] = post / e2e < 0.10
    print(json.dumps(report, indent=2))
    if a.out:
        atomic_write_json(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
