"""``sepsnet-convert SOURCE --out model.pt``: a detectron2 checkpoint trained with the authors' SE-PSNet
code or AdelaiDet BlendMask (panoptic) -> a sepsnet checkpoint (weights, config, class metadata) that
``sepsnet-eval``, ``sepsnet-export`` and ``sepsnet-train --weights`` take like any other.

An AdelaiDet FCOS detector (``FCOS_MS_R_101_2x.pth``, the authors' starting point) converts with
``--partial`` into an initialisation: backbone, FPN and FCOS towers from the file, every other
weight listed as left at its initialisation. See README "Models trained with the authors' code".
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sepsnet.cli._common import run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="detectron2 model_final.pth (or .pkl) from SE-PSNet / AdelaiDet")
    p.add_argument("--out", required=True, help="sepsnet checkpoint to write (.pt)")
    p.add_argument("--config", default=None,
                   help="sepsnet YAML whose data/solver/postprocess sections (and, with --partial, head sizes) "
                        "the converted config keeps; model keys come from the checkpoint")
    p.add_argument("--meta", default=None, help="class metadata: COCO panoptic categories JSON or sepsnet meta")
    p.add_argument("--partial", action="store_true",
                   help="allow inference weights without a source tensor (FCOS detector as initialisation)")
    p.add_argument("--stuff-thing-index", type=int, default=0,
                   help="row of the source stuff predictor holding 'things' (detectron2 panoptic: 0)")
    stride = p.add_mutually_exclusive_group()
    stride.add_argument("--stride-in-1x1", dest="stride_in_1x1", action="store_true", default=None,
                        help="stride on the bottleneck 1x1 conv (MSRA ResNet; default for ResNet)")
    stride.add_argument("--no-stride-in-1x1", dest="stride_in_1x1", action="store_false",
                        help="stride on the 3x3 conv (RESNETS.STRIDE_IN_1X1 False; default for ResNeXt)")
    p.add_argument("--input-format", choices=("RGB", "BGR"), default=None,
                   help="INPUT.FORMAT the model was trained with (default BGR, detectron2's)")
    p.add_argument("--pixel-mean", type=float, nargs=3, default=None, help="MODEL.PIXEL_MEAN (that channel order)")
    p.add_argument("--pixel-std", type=float, nargs=3, default=None, help="MODEL.PIXEL_STD (that channel order)")
    a = p.parse_args(argv)

    from sepsnet.config import SEPSNetConfig, load_config
    from sepsnet.errors import ConfigError
    from sepsnet.model.convert import convert_state, read_class_metadata, read_source, write_checkpoint

    if a.pixel_std is not None and any(v <= 0 for v in a.pixel_std):
        raise ConfigError(f"--pixel-std values must be > 0, got {a.pixel_std}")
    base = load_config(a.config) if a.config else SEPSNetConfig()
    state = read_source(a.source)
    result = convert_state(state, base, partial=a.partial, stride_in_1x1=a.stride_in_1x1,
                           input_format=a.input_format, pixel_mean=a.pixel_mean, pixel_std=a.pixel_std,
                           stuff_thing_index=a.stuff_thing_index)
    m = result.config.model
    meta = read_class_metadata(a.meta, m.num_thing_classes, m.num_stuff_classes) if a.meta else None
    out = write_checkpoint(result, a.out, meta, a.source)
    print(result.summary())
    print(f"backbone {m.backbone.name}, fpn {m.fpn_channels}, {m.num_thing_classes} thing / "
          f"{m.num_stuff_classes} stuff classes{'' if meta else ' (no --meta: generated class names)'}")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
