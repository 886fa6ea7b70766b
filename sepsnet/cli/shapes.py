"""``python -m sepsnet.cli.shapes --config X IMAGES...``: build the model, run the dense and
instance passes on real photos, print output shapes and parameter counts (train vs deploy)."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sepsnet.cli._common import run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-shapes", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("images", nargs="+")
    a = p.parse_args(argv)

    import torch

    from sepsnet.config import load_config
    from sepsnet.data.coco_panoptic import read_rgb
    from sepsnet.data.transforms import collate, normalize, resize_shape
    from sepsnet.model import build_model

    cfg = load_config(a.config)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    deploy = build_model(cfg, deploy=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"{cfg.model.backbone.name}: {count(model) / 1e6:.2f} M parameters (train), "
          f"{count(deploy) / 1e6:.2f} M (deploy, aux branches not built)")
    for path in a.images:
        rgb = read_rgb(path)
        h, w = resize_shape(*rgb.shape[:2], cfg.data.min_size_test, cfg.data.max_size_test)
        import cv2

        item = {"image": normalize(cv2.resize(rgb, (w, h)), cfg.data),
                "targets": {"masks": torch.zeros(0, h, w, dtype=torch.uint8),
                            "stuff": torch.zeros(h, w, dtype=torch.int64)}, "info": {}}
        images, _, _ = collate([item], cfg.data.size_divisibility)
        with torch.no_grad():
            t0 = time.perf_counter()
            dense = model.forward_dense(images)
            dt = time.perf_counter() - t0
            rois = torch.tensor([[0, 8.0, 8.0, w / 2, h / 2], [0, w / 4, h / 4, w - 8.0, h - 8.0]])
            inst = model.forward_instances(dense["bases"], dense["p3"], rois, dense["attention"][0, :2])
        print(f"{path}: {rgb.shape[1]}x{rgb.shape[0]} -> input {tuple(images.shape)}, dense {dt * 1000:.0f} ms")
        for name, t in list(dense.items()) + list(inst.items()):
            print(f"  {name:17s} {str(tuple(t.shape)):24s} {str(t.dtype).replace('torch.', '')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
