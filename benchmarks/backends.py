"""Torch eager vs ONNX Runtime (CPU) for the dense graph — the part that dominates latency —
for the R-50 (COCO classes) and tiny configs at 512x1024 and 1024x2048. Random weights (timing
does not depend on them). Prints a table and saves JSON. Target: ORT <= 0.7x eager.

``eager_s``: ``forward_dense`` as ``PanopticPredictor.from_checkpoint`` runs it (every location);
``eager_preselect_s``: the same with the bundle's per-level top-k pre-selection; ``ort_s``: the
bundle's ``dense.onnx`` (with pre-selection, as ``sepsnet-export`` writes it). Eager and ORT runs
alternate, so a change in machine load hits both alike.

    python benchmarks/backends.py --out backends.json [--threads 2] [--iters 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed_alternating(fns: dict, iters: int, warmup: int) -> dict[str, float]:
    """Median seconds per callable, running them in turn each iteration."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="backends.json")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sizes", default="512x1024,1024x2048")
    p.add_argument("--configs", default="tiny,r50")
    a = p.parse_args()
    import onnxruntime as ort

    from sepsnet.config import load_config, parse_overrides
    from sepsnet.export.onnx_export import ExportShape, dense_preselect, export_dense
    from sepsnet.model import build_model

    torch.set_num_threads(a.threads)
    configs = {"tiny": (ROOT / "configs" / "tiny_synthetic.yaml", []),
               "r50": (ROOT / "configs" / "coco_r101.yaml", ["model.backbone.name=resnet50"])}
    rows = []
    for name in a.configs.split(","):
        path, over = configs[name]
        cfg = load_config(path, overrides=parse_overrides(over))
        torch.manual_seed(0)
        model = build_model(cfg, deploy=True).eval()
        for size in a.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            image = torch.randn(1, 3, h, w)
            with tempfile.TemporaryDirectory() as tmp:
                onnx_path = Path(tmp) / "dense.onnx"
                sel = dense_preselect(cfg)
                export_dense(model, cfg, onnx_path, ExportShape(h, w), preselect=sel)
                so = ort.SessionOptions()
                so.intra_op_num_threads = a.threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: image.numpy()}
                with torch.inference_mode():
                    t = timed_alternating({"eager": lambda m=model, x=image: m.forward_dense(x),
                                           "eager_preselect": lambda m=model, x=image, s=sel: m.forward_dense(x, s),
                                           "ort": lambda s=sess, f=feed: s.run(None, f)}, a.iters, a.warmup)
            row = {"config": name, "size": size, "eager_s": round(t["eager"], 4),
                   "eager_preselect_s": round(t["eager_preselect"], 4), "ort_s": round(t["ort"], 4),
                   "ratio": round(t["ort"] / t["eager"], 3),
                   "ratio_vs_eager_preselect": round(t["ort"] / t["eager_preselect"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "backends", "threads": a.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "rows": rows, "target_ratio": 0.7, "met": all(r["ratio"] <= 0.7 for r in rows)}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
