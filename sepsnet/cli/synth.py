"""``sepsnet-synth --out DIR --n N [--val-n M] [--seed S] [--size 256]``: write a synthetic
COCO-panoptic dataset (``DIR/annotations/panoptic_{train,val}.json``, ``DIR/annotations/
panoptic_{train,val}/``, ``DIR/{train,val}/``); train with ``sepsnet-train --data DIR``."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from sepsnet.cli._common import nonnegative_int, positive_int, preflight, run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-synth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (COCO panoptic layout)")
    p.add_argument("--n", type=positive_int, required=True, help="number of training images")
    p.add_argument("--val-n", type=nonnegative_int, default=None, help="number of val images (default n/6, at least 1)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="same seed -> byte-identical dataset")
    p.add_argument("--size", type=positive_int, default=256, help="image height in pixels (width 1x or 1.25x)")
    a = p.parse_args(argv)
    preflight(out_dirs={"--out": a.out})
    from sepsnet.data.synthetic import generate

    val_n = a.val_n if a.val_n is not None else max(1, a.n // 6)
    start = time.perf_counter()
    generate(a.out, a.n, val_n, a.seed, a.size)
    splits = "annotations/panoptic_train.json" + (", annotations/panoptic_val.json" if val_n else "")
    print(f"wrote {a.n} train + {val_n} val images to {a.out} ({splits}) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
