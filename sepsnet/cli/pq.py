"""``sepsnet-pq``: PQ / SQ / RQ of COCO panoptic predictions against ground truth files."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sepsnet.cli._common import open_ratio, positive_int, preflight, run_cli
from sepsnet.eval.boundary import DEFAULT_DILATION_RATIO
from sepsnet.eval.pq import default_workers, format_table, pq_compute_files_multi
from sepsnet.fileio import atomic_write_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sepsnet-pq", description=(
        "Panoptic quality with the COCO panoptic API semantics (void, crowd, IoU > 0.5), "
        "vectorised and parallel over images."))
    p.add_argument("--gt-json", required=True, help="ground-truth COCO panoptic JSON")
    p.add_argument("--gt-folder", default=None, help="ground-truth PNG folder (default: JSON path without .json)")
    p.add_argument("--pred-json", required=True, help="prediction COCO panoptic JSON")
    p.add_argument("--pred-folder", default=None, help="prediction PNG folder (default: JSON path without .json)")
    p.add_argument("--json-out", default=None, help="write the results (with per-class numbers) here")
    p.add_argument("--workers", type=positive_int, default=None,
                   help=f"parallel workers: threads with the compiled helper, else processes "
                        f"(default min(cpu, 8) = {default_workers()}; 1 = in the calling thread)")
    p.add_argument("--boundary", action="store_true",
                   help="also report Boundary PQ (pair IoU = min(mask IoU, boundary IoU), Cheng et al. 2021)")
    p.add_argument("--dilation-ratio", type=open_ratio, default=DEFAULT_DILATION_RATIO,
                   help="Boundary PQ band width as a fraction of the image diagonal (default 0.02)")
    return p


def _jsonable(results: dict) -> dict:
    out = dict(results)
    out["per_class"] = {str(k): v for k, v in results["per_class"].items()}
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    preflight(out_files={"--json-out": args.json_out},  # before the PNGs are read
              inputs={"--gt-json": args.gt_json, "--pred-json": args.pred_json, "--gt-folder": args.gt_folder,
                      "--pred-folder": args.pred_folder})
    t0 = time.perf_counter()
    ratios = (None, args.dilation_ratio) if args.boundary else (None,)
    summaries = pq_compute_files_multi(args.gt_json, args.pred_json, args.gt_folder, args.pred_folder,
                                       workers=args.workers, ratios=ratios)  # one pass over the PNGs
    results = summaries[0]
    print(format_table(results))
    out = _jsonable(results)
    if args.boundary:
        boundary = summaries[1]
        print(f"\nBoundary PQ (dilation ratio {args.dilation_ratio:g})")
        print(format_table(boundary))
        out["boundary"] = {"dilation_ratio": args.dilation_ratio, **_jsonable(boundary)}
    print(f"Time elapsed: {time.perf_counter() - t0:.2f} seconds")
    if args.json_out:
        atomic_write_json(out, args.json_out)
        print(f"wrote {args.json_out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
