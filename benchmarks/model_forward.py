"""Parameter counts and CPU ``forward_dense`` time of SE-PSNet (train vs deploy parameters).

Models: the tiny demo config (configs/tiny_synthetic.yaml) at 256x256, and R-50 / R-101 with
the COCO class counts of configs/coco_r101.yaml at 800x1333 (padded to 800x1344, the network
input is a multiple of 32). Weights are random (weights=None); times are the median of
``--repeats`` runs after one warm-up, in seconds, on the CPU with ``--threads`` threads.
Prints JSON and writes it atomically to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sepsnet.config import load_config
from sepsnet.model.sepsnet import SEPSNet

ROOT = Path(__file__).resolve().parents[1]


def _pad32(x: int) -> int:
    return -(-x // 32) * 32


def measure(name: str, model_cfg, hw: tuple[int, int], repeats: int) -> dict:
    torch.manual_seed(0)
    train = SEPSNet(model_cfg)
    deploy = SEPSNet(model_cfg, deploy=True).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    h, w = _pad32(hw[0]), _pad32(hw[1])
    images = torch.randn(1, 3, h, w)
    times = []
    with torch.inference_mode():
        deploy.forward_dense(images)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            deploy.forward_dense(images)
            times.append(time.perf_counter() - t0)
    parts = {n: count(m) for n, m in deploy.named_children()}
    return {"model": name, "backbone": model_cfg.backbone.name, "input_hw": [h, w],
            "params_train": count(train), "params_deploy": count(deploy),
            "params_aux": count(train) - count(deploy), "params_by_part": parts,
            "forward_dense_s": statistics.median(times), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--skip-large", action="store_true", help="only the tiny model")
    ap.add_argument("--out", default=None, help="JSON output file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiny = load_config(ROOT / "configs/tiny_synthetic.yaml").model
    coco = load_config(ROOT / "configs/coco_r101.yaml").model
    runs = [("tiny", tiny, (256, 256))]
    if not args.skip_large:
        for bb in ("resnet50", "resnet101"):
            cfg = dataclasses.replace(coco, backbone=dataclasses.replace(coco.backbone, name=bb,
                                                                         pretrained=None))
            runs.append((f"coco_{bb}", cfg, (800, 1333)))
    results = [measure(n, c, hw, args.repeats) for n, c, hw in runs]
    report = {"device": "cpu", "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
