"""``sepsnet-eval``: PQ, Boundary PQ and mask AP of a checkpoint or of an exported bundle.

    sepsnet-eval --checkpoint C [--config X] [--data DIR] [--split val] [--out DIR] [--skip-bad]
    sepsnet-eval --bundle B [--backend ort|trt] [--precision fp32|fp16|int8] [--trt-graph 11|10] [--data DIR] ...
    sepsnet-eval --checkpoint C --bundle B --compare [--json FILE] [--data DIR] ...

A bundle is evaluated through ``PanopticPredictor`` exactly as it runs in deployment (its input size,
its graphs or plans, the same post-processing); ``--compare`` prints one table (PQ / PQ_th / PQ_st / mask AP
of the checkpoint and of every graph the bundle has, with deltas) and saves it as JSON. A bad image is an
error naming the file; with ``--skip-bad`` it is left out with a warning and counted (``skipped``)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sepsnet.cli._common import open_ratio, positive_int, preflight, run_cli


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepsnet-eval", description="Evaluate SE-PSNet (PQ, mask AP): a checkpoint, "
                                "an exported bundle, or both compared.")
    p.add_argument("--checkpoint", default=None, help="training checkpoint")
    p.add_argument("--bundle", default=None, help="export bundle folder (sepsnet-export)")
    p.add_argument("--backend", choices=("ort", "trt"), default="ort",
                   help="bundle runtime: ONNX Runtime (default; fp32, fp16 and Q/DQ int8 graphs) or TensorRT plans")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                   help="bundle graphs to score with ONNX Runtime (default fp32, what the ORT predictor runs)")
    p.add_argument("--trt-graph", choices=("11", "10"), default="11",
                   help="with --precision: the TensorRT 11 engine graph (engine_onnx) or the TensorRT 10 one")
    p.add_argument("--compare", action="store_true",
                   help="with --checkpoint and --bundle: one table, checkpoint vs every graph of the bundle")
    p.add_argument("--json", default=None, help="--compare table file (default OUT/compare.json or compare.json)")
    p.add_argument("--config", default=None, help="default: the config stored in the checkpoint")
    p.add_argument("--data", default=None, help="dataset root (default data.val_root)")
    p.add_argument("--split", default=None, help="default data.val_split")
    p.add_argument("--out", default=None, help="write predictions (COCO panoptic) and metrics.json here")
    p.add_argument("--max-images", type=positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-ap", action="store_true", help="skip mask AP (pycocotools)")
    p.add_argument("--boundary", nargs="?", type=open_ratio, const=0.02, default=None, metavar="RATIO",
                   help="also report Boundary PQ (band = RATIO x image diagonal, default 0.02)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable / wrong-mode images with a warning (counted as 'skipped') "
                        "instead of stopping with an error")
    return p.parse_args(argv)


def _checkpoint_metrics(a: argparse.Namespace, out: str | None) -> dict[str, Any]:
    import torch

    from sepsnet.config import _merge, config_from_dict, load_config, parse_overrides
    from sepsnet.data.loader import build_dataset
    from sepsnet.eval.evaluator import evaluate_model
    from sepsnet.model import build_model
    from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint, load_model_weights

    ckpt = load_checkpoint(a.checkpoint)
    overrides = parse_overrides(list(a.set))
    if a.config:
        cfg = load_config(a.config, overrides=overrides)
        check_compatible(ckpt, cfg, a.checkpoint)
    else:
        cfg = config_from_dict(_merge(checkpoint_config(ckpt, a.checkpoint).to_dict(), overrides))
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], a.checkpoint)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    dataset = build_dataset(cfg, train=False, root=a.data, split=a.split)
    metrics = evaluate_model(model, dataset, cfg, out_dir=out, max_images=a.max_images, with_ap=not a.no_ap,
                             boundary_ratio=a.boundary, skip_bad=a.skip_bad)
    metrics["_dataset"] = dataset
    return metrics


def _bundle_setup(a: argparse.Namespace) -> tuple[dict[str, Any], Any, Any]:
    """(manifest, config, dataset) of ``--bundle`` (its config; ``--set`` overrides the data part only)."""
    from sepsnet.config import _merge, config_from_dict, parse_overrides
    from sepsnet.data.loader import build_dataset
    from sepsnet.export.bundle import verify_bundle

    manifest = verify_bundle(a.bundle)
    cfg = config_from_dict(_merge(manifest["config"], parse_overrides(list(a.set))), where=f"{a.bundle}/manifest.json")
    return manifest, cfg, build_dataset(cfg, train=False, root=a.data, split=a.split)


def _print_metrics(metrics: dict[str, Any], dataset: Any) -> None:
    from sepsnet.eval.pq import format_table

    table = {}
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        table[name] = {"pq": metrics["PQ" + suffix], "sq": metrics["SQ" + suffix], "rq": metrics["RQ" + suffix],
                       "n": len(dataset.meta.things if suffix == "_th" else dataset.meta.stuff if suffix == "_st"
                                else dataset.meta.categories())}
    print(format_table(table))
    extra = {k: round(v, 4) for k, v in metrics.items()
             if k in ("mask_AP", "box_AP", "seconds_per_image") or k.startswith("PQ_boundary")}
    print(json.dumps({"images": metrics["images"], "skipped": metrics["skipped"], **extra}))


def _main(argv: Sequence[str] | None) -> int:
    from sepsnet.errors import ConfigError
    from sepsnet.eval import bundle_eval

    a = _parse(argv)
    preflight(device=a.device, out_dirs={"--out": a.out},
              out_files={"--json": a.json})  # before the checkpoint, the bundle and the data are loaded
    if a.compare and not (a.checkpoint and a.bundle):
        raise ConfigError("--compare needs both --checkpoint C and --bundle DIR")
    if not a.compare and bool(a.checkpoint) == bool(a.bundle):
        raise ConfigError("give --checkpoint C or --bundle DIR (both only with --compare)")
    if a.json and not a.compare:
        raise ConfigError("--json only applies with --compare")
    if a.checkpoint and not a.compare:
        metrics = _checkpoint_metrics(a, a.out)
        _print_metrics(metrics, metrics.pop("_dataset"))
        return 0
    manifest, cfg, dataset = _bundle_setup(a)
    kw = {"max_images": a.max_images, "with_ap": not a.no_ap, "boundary_ratio": a.boundary, "skip_bad": a.skip_bad}
    if not a.compare:
        graph_set = bundle_eval.select(manifest, a.precision, a.backend, a.trt_graph)
        print(f"evaluating {a.bundle} ({bundle_eval.input_desc(manifest)} input): {graph_set.name}, "
              f"graphs {graph_set.dense} + {graph_set.instance} on {a.backend}", file=sys.stderr)
        for note in graph_set.notes:
            print(f"note: {note}", file=sys.stderr)
        metrics = bundle_eval.evaluate_bundle(a.bundle, graph_set, dataset, cfg, threads=a.threads, out_dir=a.out, **kw)
        _print_metrics(metrics, dataset)
        return 0
    ref = _checkpoint_metrics(a, str(Path(a.out) / "checkpoint") if a.out else None)
    ref.pop("_dataset")
    table = bundle_eval.compare(ref, a.bundle, manifest, dataset, cfg, backend=a.backend, threads=a.threads,
                                out_dir=a.out, **kw)
    table["checkpoint"] = str(a.checkpoint)
    print(f"{a.bundle} ({table['input']} input) vs {a.checkpoint}, {ref['images']} images")
    print(bundle_eval.format_table(table["rows"]))
    path = bundle_eval.save(table, a.json or (Path(a.out) / "compare.json" if a.out else "compare.json"))
    print(f"saved {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
