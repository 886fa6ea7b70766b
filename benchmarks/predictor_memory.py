"""Resident memory of a PanopticPredictor (ONNX Runtime, CPU) over a long frame loop.

    python benchmarks/predictor_memory.py --bundle BUNDLE --frames 1000 --out mem.json
Without --bundle a tiny random-weight bundle is exported to a temp folder first.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_bundle(folder: Path) -> Path:
    from sepsnet.cli.export import main as export_main
    from sepsnet.config import load_config, parse_overrides
    from sepsnet.model import build_model
    from sepsnet.train.checkpoint import save_checkpoint

    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml",
                      overrides=parse_overrides(["postprocess.score_thresh=0.005",
                                                 "postprocess.instance_score_thresh=0.0"]))
    torch.manual_seed(0)
    ckpt = save_checkpoint(folder / "tiny.pt", model=build_model(cfg), cfg=cfg, iteration=0)
    assert export_main([str(ckpt), "--out", str(folder / "bundle"), "--onnx-only"]) == 0
    return folder / "bundle"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle")
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--out", default="predictor_memory.json")
    a = p.parse_args()
    from sepsnet.engines.predictor import PanopticPredictor

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(a.bundle) if a.bundle else make_bundle(Path(tmp))
        pred = PanopticPredictor.from_bundle(bundle, backend="ort")
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(8)]
        proc = psutil.Process()
        for i in range(20):  # warm-up: allocator pools, ORT arenas
            pred(frames[i % 8])
        samples = []
        for i in range(a.frames):
            pred(frames[i % 8])
            if i % 50 == 0 or i == a.frames - 1:
                samples.append((i, proc.memory_info().rss / 2**20))
    first, last = samples[0][1], samples[-1][1]
    result = {"benchmark": "predictor_memory", "frames": a.frames, "rss_start_mib": round(first, 1),
              "rss_end_mib": round(last, 1), "growth_mib": round(last - first, 1),
              "rss_max_mib": round(max(s[1] for s in samples), 1), "samples": samples}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
