"""``sepsnet-demo (--bundle DIR | --checkpoint C [--config X]) IMAGES... --out DIR``:
panoptic predictions (COCO panoptic PNG+JSON) and overlay PNGs for a few images."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sepsnet.cli._common import preflight, run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-demo", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="export bundle folder (ONNX Runtime / TensorRT)")
    src.add_argument("--checkpoint", help="training checkpoint (eager PyTorch)")
    p.add_argument("--config", help="config for --checkpoint (default: the stored one)")
    p.add_argument("--backend", default="auto", help="auto | ort | trt (with --bundle)")
    p.add_argument("--out", required=True)
    p.add_argument("images", nargs="+")
    a = p.parse_args(argv)
    preflight(out_dirs={"--out": a.out})  # before the model is loaded

    from sepsnet.config import load_config
    from sepsnet.data.coco_panoptic import read_rgb
    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.postprocess.writers import CocoPanopticWriter, write_overlay

    if a.bundle:
        predictor = PanopticPredictor.from_bundle(a.bundle, backend=a.backend)
    else:
        predictor = PanopticPredictor.from_checkpoint(a.checkpoint, load_config(a.config) if a.config else None)
    out = Path(a.out)
    writer = CocoPanopticWriter(out, predictor.classes)
    for i, path in enumerate(a.images):
        rgb = read_rgb(path)
        result = predictor(rgb).to("cpu")
        writer.add(result, i, Path(path).name)
        overlay = out / f"{Path(path).stem}_overlay.png"
        write_overlay(overlay, rgb, result, predictor.classes)
        names = [(predictor.classes["things"] if s["isthing"] else predictor.classes["stuff"])[s["category_id"]]["name"]
                 for s in result.segments_info]
        print(f"{path}: {len(result.segments_info)} segments ({', '.join(names[:8])}{'...' if len(names) > 8 else ''}), "
              f"{result.timings['total'] * 1000:.0f} ms -> {overlay}")
    print(f"predictions: {writer.close()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
