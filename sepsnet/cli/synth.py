"""``sepsnet-synth --out DIR --n N``: write a synthetic COCO-panoptic dataset."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sepsnet.cli._common import run_cli


def _main(argv: Optional[Sequence[str]]) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-synth", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (COCO panoptic layout)")
    p.add_argument("--n", type=int, required=True, help="number of training images")
    p.add_argument("--val-n", type=int, default=None, help="number of val images (default n/6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image height in pixels")
    a = p.parse_args(argv)
    from sepsnet.data.synthetic import generate

    val_n = a.val_n if a.val_n is not None else max(1, a.n // 6)
    generate(a.out, a.n, val_n, a.seed, a.size)
    print(f"wrote {a.n} train + {val_n} val images to {a.out} "
          f"(annotations/panoptic_train.json, annotations/panoptic_val.json)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
