"""Accuracy of every deployed precision, measured like the checkpoint (issue 15; README "Deployment accuracy").

Trains the tiny model on synthetic data as ``learn_synthetic.py`` does (or takes ``--checkpoint``), exports

    dynamic fp32 bundle                 (--dynamic: padded to a multiple of 32, like evaluation)
    static fp32 / fp16 / int8 bundles   (the default static input size, as deployed)

and evaluates the checkpoint and every graph the manifests name for TensorRT 10 and 11 (``onnx``,
``engine_onnx``, ``engine_onnx_trt10``) through ``PanopticPredictor`` on ONNX Runtime, on the held-out val
split. int8 is calibrated on the training split (``--calib-methods``: one bundle per range estimator);
the TensorRT 11 int8 graph is also scored without the fp16 bias fix (``calibration.split_fp16_biases``)
to show what it repairs. Prints a Markdown table and writes JSON.

    python benchmarks/precision_accuracy.py --out runs/precision --minutes 15
    python benchmarks/precision_accuracy.py --out runs/precision --checkpoint runs/learn/train/model_final.pt \\
        --data runs/learn/synthetic          # reuse a trained model

Targets: fp16 within 0.5 PQ of fp32, int8 within 2.0 PQ, dynamic fp32 bundle PQ equal to the checkpoint's
(static bundles reported beside it: their wider zero border changes the output).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"fp16_vs_fp32": 0.5, "int8_vs_fp32": 2.0, "dynamic_vs_checkpoint": 0.0}


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, data: Path, a: argparse.Namespace) -> Path:
    if not (data / "annotations" / "panoptic_val.json").is_file():
        run("sepsnet.cli.synth", "--out", str(data), "--n", str(a.n_train), "--val-n", str(a.n_val),
            "--size", str(a.size))
    ckpt = out / "train" / "model_final.pt"
    if not ckpt.is_file():
        run("sepsnet.cli.train", "--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), "--data", str(data),
            "--out", str(out / "train"), "--max-iter", str(a.iters), "--max-minutes", str(a.minutes),
            "--no-progress", *(["--set", *a.set] if a.set else []))
    return ckpt


def export(ckpt: Path, out: Path, *flags: str) -> Path:
    if not (out / "manifest.json").is_file():
        run("sepsnet.cli.export", str(ckpt), "--out", str(out), "--onnx-only", *flags)
    return out


def unfixed_int8_row(bundle: Path, dataset: Any, cfg: Any, ref: dict[str, Any], threads: int | None,
                     max_images: int | None) -> dict[str, Any]:
    """The TensorRT 11 int8 graph as written before the fix: Q/DQ over fp16 with the fp16 biases left in the
    quantized convolutions (ORT folds them into int32 and overflows fp16)."""
    import onnx

    from sepsnet.engines.ort_backend import OrtBackend
    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.eval import bundle_eval
    from sepsnet.eval.evaluator import evaluate_predictor

    folded = bundle.parent / f".{bundle.name}.unfixed.onnx"
    if not folded.is_file():
        model = onnx.load(str(bundle / "dense.fp16.int8.onnx"))
        onnx.save(fold_bias_adds(model), str(folded))
    predictor = PanopticPredictor.from_bundle(bundle, backend="ort", threads=threads)
    predictor.dense = OrtBackend(folded, threads=threads)
    metrics = evaluate_predictor(predictor, dataset, cfg, max_images=max_images)
    return bundle_eval.row("int8 (TensorRT 11 graph), before the bias fix", metrics, ref,
                           graphs={"dense": "dense.fp16.int8.onnx with the fp16 biases back in the convs"}, notes=[])


def fold_bias_adds(model: Any) -> Any:
    """Undo ``split_fp16_biases``: Conv -> Add(bias) back into Conv(x, w, bias)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    by_input: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            by_input.setdefault(i, []).append(n)
    drop = set()
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) > 2 or not n.output[0].endswith("__nobias"):
            continue
        add = by_input[n.output[0]][0]
        bias = numpy_helper.to_array(inits[add.input[1]]).reshape(-1)
        name = f"{n.name}__folded_bias"
        model.graph.initializer.append(numpy_helper.from_array(bias, name))
        n.input.append(name)
        n.output[0] = add.output[0]
        drop.add(add.name)
    kept = [n for n in model.graph.node if n.name not in drop]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    onnx.checker.check_model(model)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/precision_accuracy")
    p.add_argument("--checkpoint", help="trained checkpoint (skips data synthesis and training)")
    p.add_argument("--data", help="dataset root with train + val splits (default OUT/synthetic)")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall time (as learn_synthetic.py)")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--size", type=int, default=256, help="synthetic image height")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="training config overrides")
    p.add_argument("--calib-methods", default="minmax,percentile,entropy")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="result file (default OUT/precision_accuracy.json)")
    a = p.parse_args()

    from sepsnet.data.loader import build_dataset
    from sepsnet.eval import bundle_eval
    from sepsnet.eval.evaluator import evaluate_model
    from sepsnet.export.bundle import verify_bundle
    from sepsnet.fileio import atomic_write_json
    from sepsnet.model import build_model
    from sepsnet.model.weights import checkpoint_config, load_checkpoint, load_model_weights

    out = Path(a.out)
    data = Path(a.data) if a.data else out / "synthetic"
    t0 = time.perf_counter()
    ckpt = Path(a.checkpoint) if a.checkpoint else train(out, data, a)
    train_s = time.perf_counter() - t0
    state = load_checkpoint(ckpt)
    cfg = checkpoint_config(state, str(ckpt))
    model = build_model(cfg)
    load_model_weights(model, state["model"], str(ckpt))
    dataset = build_dataset(cfg, train=False, root=str(data))
    kw = {"threads": a.threads, "max_images": a.max_images}
    ref = evaluate_model(model, dataset, cfg, max_images=a.max_images)
    rows = [bundle_eval.row("checkpoint (PyTorch)", ref, None, bundle=None, input="eval (multiple of 32)")]
    bundles = {"dynamic fp32": export(ckpt, out / "bundle_dynamic", "--dynamic", "--max-batch", "2"),
               "static fp16": export(ckpt, out / "bundle_fp16", "--fp16")}
    methods = [m for m in a.calib_methods.split(",") if m]
    for m in methods:
        bundles[f"static int8 {m}"] = export(ckpt, out / f"bundle_int8_{m}", "--int8", "--calib", str(data),
                                             "--calib-method", m, "--calib-count", str(a.calib_count))
    for label, bundle in bundles.items():
        manifest = verify_bundle(bundle)
        for s in bundle_eval.graph_sets(manifest):
            if s.precision == "fp32" and label.startswith("static int8"):
                continue  # the same static fp32 graphs as the fp16 bundle's
            metrics = bundle_eval.evaluate_bundle(bundle, s, dataset, cfg, **kw)
            name = f"{label.split(' ')[0]} {s.name}" + (f" [{label.split(' ')[-1]}]" if "int8" in label else "")
            rows.append(bundle_eval.row(name, metrics, ref, bundle=bundle.name, input=bundle_eval.input_desc(manifest),
                                        graphs={"dense": s.dense, "instance": s.instance}, notes=s.notes))
            print(f"{name}: PQ {rows[-1]['PQ']:.2f}", flush=True)
    if methods:
        rows.append(unfixed_int8_row(bundles[f"static int8 {methods[0]}"], dataset, cfg, ref, a.threads,
                                     a.max_images))
        rows[-1]["name"] += f" [{methods[0]}]"
    by = {r["name"]: r for r in rows}
    static32 = by["static fp32"]["PQ"]
    checks = {"dynamic_vs_checkpoint": abs(by["dynamic fp32"]["PQ"] - by["checkpoint (PyTorch)"]["PQ"]),
              "static_vs_checkpoint": by["static fp32"]["PQ"] - by["checkpoint (PyTorch)"]["PQ"],
              "fp16_vs_fp32": max(abs(r["PQ"] - static32) for r in rows if r["name"].startswith("static fp16 (")),
              "int8_vs_fp32": {r["name"]: r["PQ"] - static32 for r in rows if "int8 (" in r["name"]}}
    fixed = {k: v for k, v in checks["int8_vs_fp32"].items() if "before the bias fix" not in k}
    default = [v for k, v in fixed.items() if methods and k.endswith(f"[{methods[0]}]")]
    result = {"benchmark": "precision_accuracy", "checkpoint": str(ckpt), "data": str(data),
              "images": ref["images"], "train_seconds": round(train_s, 1) if not a.checkpoint else None,
              "iterations": int(state.get("iteration", 0)), "threads": os.cpu_count(), "rows": rows,
              "checks": checks, "targets": TARGETS,
              "met": {"fp16_vs_fp32": checks["fp16_vs_fp32"] <= TARGETS["fp16_vs_fp32"],
                      "int8_vs_fp32": bool(default) and min(default) >= -TARGETS["int8_vs_fp32"],
                      "int8_all_methods": bool(fixed) and min(fixed.values()) >= -TARGETS["int8_vs_fp32"],
                      "dynamic_vs_checkpoint": checks["dynamic_vs_checkpoint"] < 1e-6}}
    print("\n| graphs (ONNX Runtime, CPU) | input | PQ | PQ_th | PQ_st | mask AP | ΔPQ vs checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r.get('input', '')} | {r['PQ']:.2f} | {r['PQ_th']:.2f} | {r['PQ_st']:.2f} | "
              f"{r.get('mask_AP', float('nan')):.2f} | {r.get('delta_PQ', 0.0):+.2f} |")
    print(json.dumps({"checks": checks, "met": result["met"]}, indent=2))
    atomic_write_json(result, Path(a.json) if a.json else out / "precision_accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
