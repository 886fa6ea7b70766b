"""Time each post-processing stage for N instances at 1024x2048 (default: CPU).

Synthetic dense outputs shaped like a Cityscapes model (8 thing, 11 stuff classes, K=4, M=14),
a stand-in instance engine returning blob-shaped 56x56 probabilities, then
``sepsnet.postprocess.pipeline.panoptic_inference``. Prints and saves JSON (``--out``) with the
median seconds per stage over ``--repeats`` runs. ``--reference`` also times a torchvision
ResNet-50 trunk forward at the same size (weights=None): a lower bound of the R-50 model's
end-to-end CPU time, to check the "post-processing < 10%" target.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from sepsnet.config import SEPSNetConfig
from sepsnet.postprocess.candidates import level_sizes
from sepsnet.postprocess.pipeline import panoptic_inference


def make_dense(h: int, w: int, num_instances: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, s, k, m = 8, 11, 4, 14
    sizes = level_sizes((h // 8, w // 8), 5)
    locs, strides = [], []
    for lvl, (lh, lw) in enumerate(sizes):
        st = 8 * 2 ** lvl
        ys, xs = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
        locs.append(torch.stack([xs.reshape(-1) * st + st // 2, ys.reshape(-1) * st + st // 2], 1).float())
        strides.append(torch.full((lh * lw,), float(st)))
    loc, stride = torch.cat(locs), torch.cat(strides)
    num_loc = loc.shape[0]
    ext = (torch.rand(num_loc, 4, generator=g) * 4 + 1) * stride[:, None] * 2  # l, t, r, b
    boxes = torch.cat([loc - ext[:, :2], loc + ext[:, 2:]], 1)
    scores = torch.rand(num_loc, t, generator=g) * 0.06  # background: many above 0.05
    hot = torch.randperm(num_loc, generator=g)[: int(num_instances * 1.5)]
    scores[hot, torch.randint(0, t, (hot.numel(),), generator=g)] = 0.5 + 0.5 * torch.rand(hot.numel(), generator=g)
    stuff = torch.randn(1, s + 1, h // 4, w // 4, generator=g)
    stuff = torch.nn.functional.avg_pool2d(stuff, 31, 1, 15) * 10  # smooth blobs of stuff classes
    dense = {
        "boxes": boxes[None], "scores": scores[None], "centerness": 0.5 + 0.5 * torch.rand(1, num_loc, generator=g),
        "attention": torch.randn(1, num_loc, k * m * m, generator=g), "bases": torch.randn(1, k + 1, h // 4, w // 4, generator=g),
        "p3": torch.randn(1, 16, h // 8, w // 8, generator=g), "stuff_logits": stuff,
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference", action="store_true", help="also time a ResNet-50 trunk forward")
    p.add_argument("--out", default=None, help="JSON output path")
    a = p.parse_args(argv)
    cfg = SEPSNetConfig()
    cfg.postprocess.max_instances = a.instances
    dense = make_dense(a.height, a.width, a.instances, a.device)
    sizes = [((a.height, a.width), (a.height, a.width))]
    panoptic_inference(dense, blob_instances, sizes, cfg)  # warm-up
    runs = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        (res,) = panoptic_inference(dense, blob_instances, sizes, cfg)
        wall = time.perf_counter() - t0
        runs.append({**res.timings, "wall": wall})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["postprocess_excl_instance_engine"] = med["wall"] - med["instances"]
    report = {
        "size": [a.height, a.width], "device": a.device, "torch_threads": torch.get_num_threads(),
        "instances_kept": res.num_instances, "segments": len(res.segments_info), "repeats": a.repeats,
        "median_seconds": {k: round(v, 5) for k, v in med.items()},
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }
    if a.reference:
        import torchvision

        trunk = torchvision.models.resnet50(weights=None).eval()
        x = torch.randn(1, 3, a.height, a.width)
        with torch.inference_mode():
            t0 = time.perf_counter()
            trunk(x)
            ref = time.perf_counter() - t0
        report["resnet50_trunk_forward_seconds"] = round(ref, 3)
        report["postprocess_fraction_of_trunk_plus_postprocess"] = round(
            med["postprocess_excl_instance_engine"] / (ref + med["postprocess_excl_instance_engine"]), 4)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        d = os.path.dirname(os.path.abspath(a.out))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
