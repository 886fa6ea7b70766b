"""Proof of learning on CPU: synthesize ~300 train / 50 val images (about 256x256), train the
tiny config for at most 15 minutes, evaluate PQ on val. Target PQ >= 0.6. Prints JSON.

    python benchmarks/learn_synthetic.py --out runs/learn --minutes 15
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="runs/learn_synthetic")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--iters", type=int, default=2000)
    a = p.parse_args()
    out = Path(a.out)
    bin_dir = Path(sys.executable).parent
    data = out / "synthetic"
    if not (data / "annotations" / "panoptic_val.json").is_file():
        run([str(bin_dir / "sepsnet-synth"), "--out", str(data), "--n", str(a.n_train), "--val-n", str(a.n_val)])
    t0 = time.perf_counter()
    run([str(bin_dir / "sepsnet-train"), "--config", str(ROOT / "configs" / "tiny_synthetic.yaml"),
         "--data", str(data), "--out", str(out / "train"), "--max-iter", str(a.iters),
         "--max-minutes", str(a.minutes), "--no-progress", "--resume"])  # a rerun continues, never overwrites
    train_s = time.perf_counter() - t0
    run([str(bin_dir / "sepsnet-eval"), "--checkpoint", str(out / "train" / "model_final.pt"),
         "--data", str(data), "--out", str(out / "eval"), "--boundary"])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    from sepsnet.fileio import atomic_write_json
    from sepsnet.model.weights import load_checkpoint

    iterations = int(load_checkpoint(out / "train" / "model_final.pt")["iteration"])
    result = {"benchmark": "learn_synthetic", "train_seconds": round(train_s, 1), "iterations": iterations,
              "threads": os.cpu_count(), "PQ": metrics["PQ"], "PQ_things": metrics["PQ_th"],
              "PQ_stuff": metrics["PQ_st"], "SQ": metrics["SQ"], "RQ": metrics["RQ"],
              "boundary_PQ": metrics.get("PQ_boundary"), "mask_AP": metrics.get("mask_AP"), "target_PQ": 0.6,
              "met": metrics["PQ"] >= 0.6}
    print(json.dumps(result, indent=2))
    atomic_write_json(result, out / "learn_synthetic.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
