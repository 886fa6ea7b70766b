"""``sepsnet-eval --checkpoint C [--config X] [--data DIR] [--split val] [--out DIR] [--skip-bad]``:
PQ (and mask AP) of a checkpoint on a COCO-panoptic-layout dataset. A bad image is an error
naming the file; with ``--skip-bad`` it is left out with a warning and counted (``skipped``)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from sepsnet.cli._common import open_ratio, positive_int, preflight, run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-eval", description="Evaluate SE-PSNet (PQ, mask AP).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--data", default=None, help="dataset root (default data.val_root)")
    p.add_argument("--split", default=None, help="default data.val_split")
    p.add_argument("--out", default=None, help="write predictions (COCO panoptic) and metrics.json here")
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-ap", action="store_true", help="skip mask AP (pycocotools)")
    p.add_argument("--boundary", nargs="?", type=open_ratio, const=0.02, default=None, metavar="RATIO",
                   help="also report Boundary PQ (band = RATIO x image diagonal, default 0.02)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable / wrong-mode images with a warning (counted as 'skipped') "
                        "instead of stopping with an error")
    a = p.parse_args(argv)
    preflight(device=a.device, out_dirs={"--out": a.out})  # before the checkpoint and the data are loaded

    import torch

    from sepsnet.config import load_config, parse_overrides
    from sepsnet.data.loader import build_dataset
    from sepsnet.eval.evaluator import evaluate_model
    from sepsnet.eval.pq import format_table
    from sepsnet.model import build_model
    from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint, load_model_weights

    ckpt = load_checkpoint(a.checkpoint)
    overrides = parse_overrides(list(a.set))
    if a.config:
        cfg = load_config(a.config, overrides=overrides)
        check_compatible(ckpt, cfg, a.checkpoint)
    else:
        from sepsnet.config import (
            _merge,
            config_from_dict,
        )

        cfg = config_from_dict(_merge(checkpoint_config(ckpt, a.checkpoint).to_dict(), overrides))
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], a.checkpoint)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    dataset = build_dataset(cfg, train=False, root=a.data, split=a.split)
    metrics = evaluate_model(model, dataset, cfg, out_dir=a.out, max_images=a.max_images, with_ap=not a.no_ap,
                             boundary_ratio=a.boundary, skip_bad=a.skip_bad)
    table = {"All": {}, "Things": {}, "Stuff": {}}
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        table[name] = {"pq": metrics["PQ" + suffix], "sq": metrics["SQ" + suffix], "rq": metrics["RQ" + suffix],
                       "n": len(dataset.meta.things if suffix == "_th" else dataset.meta.stuff if suffix == "_st"
                                else dataset.meta.categories())}
    print(format_table(table))
    extra = {k: round(v, 4) for k, v in metrics.items() if k in ("mask_AP", "box_AP", "seconds_per_image") or k.startswith("PQ_boundary")}
    print(json.dumps({"images": metrics["images"], "skipped": metrics["skipped"], **extra}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
