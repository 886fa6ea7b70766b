"""``sepsnet-export``: checkpoint -> ONNX graphs (+ TensorRT engines) + manifest (DESIGN.md "Export bundle").

    sepsnet-export CKPT --out DIR [--config X] [--fp32 | --fp16 | --int8 --calib DIR|synthetic [--calib-method M]]
                   [--plugin] [--onnx-only] [--height H --width W] [--dynamic] [--hardware-compatible]
                   [--version-compatible]
    sepsnet-export --from-onnx DIR [--out DIR2] [--fp32 | --fp16 | --int8 --calib ...] [--plugin]  # engines on target

Exit codes: 0 done; 2 error (message on stderr); 3 (``EXIT_NEEDS_TRT``) the ONNX bundle is written and
valid but TensorRT engines were not built because this machine lacks TensorRT or an NVIDIA GPU (both
the checkpoint path and ``--from-onnx``). The work is done by :mod:`sepsnet.export.pipeline`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sepsnet.cli._common import positive_float, positive_int, preflight, run_cli
from sepsnet.errors import ConfigError
from sepsnet.export.calibration import DEFAULT_METHOD, METHODS, require_source
from sepsnet.export.pipeline import PLUGIN_NAME, PLUGIN_SEARCH, BundleExporter, EnginesNotBuilt, ExportOptions

EXIT_NEEDS_TRT = 3  # ONNX bundle written and valid; engines need TensorRT + an NVIDIA GPU


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepsnet-export",
                                description="Checkpoint -> ONNX graphs (+ TensorRT engines) + manifest.json bundle.")
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (.pth)")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                      help="fp32 graphs / engines (the default for a checkpoint; --from-onnx keeps the bundle's)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="fp16 graph / engine (sensitive ops stay fp32)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="int8 Q/DQ dense graph calibrated with ONNX Runtime")
    p.add_argument("--calib", metavar="DIR|synthetic",
                   help="--int8 calibration images: a folder of images, or a dataset root (its train split); "
                        "'synthetic': generated shapes, smoke tests only. Required with --int8")
    p.add_argument("--calib-count", type=positive_int, default=32,
                   help="calibration frames, spread over the images (default 32)")
    p.add_argument("--calib-method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"activation range estimator for --int8 (default {DEFAULT_METHOD})")
    p.add_argument("--plugin", action="store_true", help="instance graph with one SEPSNetRoiBlend plugin node")
    p.add_argument("--plugin-lib", help=f"path of {PLUGIN_NAME} (default: searched in {', '.join(PLUGIN_SEARCH)}; "
                                        "`make plugins` builds it)")
    p.add_argument("--onnx-only", action="store_true", help="write the ONNX bundle, build no TensorRT engine")
    p.add_argument("--height", type=positive_int, help="input height (multiple of 32; default: padded min_size_test)")
    p.add_argument("--width", type=positive_int, help="input width (multiple of 32; default: padded max_size_test)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch/height/width (profiles in the manifest)")
    p.add_argument("--max-batch", type=positive_int, default=4, help="largest batch with --dynamic (default 4)")
    p.add_argument("--from-onnx", metavar="DIR", help="build TensorRT engines for an existing ONNX bundle")
    p.add_argument("--workspace-gib", type=positive_float, default=4.0, help="TensorRT workspace pool limit (GiB)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file, reused across builds (default: "
                                          "~/.cache/sepsnet/trt_timing_<TensorRT version>_<GPU>.cache)")
    p.add_argument("--hardware-compatible", action="store_true",
                   help="plans that run on every discrete Ampere or newer GPU (compute capability >= 8.0), not only "
                        "on the build GPU's compute capability (TensorRT's AMPERE_PLUS level; may be slower)")
    p.add_argument("--version-compatible", action="store_true",
                   help="plans that later TensorRT versions also run (TensorRT's VERSION_COMPATIBLE flag)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> ExportOptions:
    if args.from_onnx and args.checkpoint:
        raise ConfigError("give either a checkpoint or --from-onnx DIR, not both")
    return ExportOptions(**{k: v for k, v in vars(args).items() if k not in ("checkpoint", "from_onnx")})


def main_args(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.precision == "int8":
        require_source(args.calib)  # the most likely mistake first, before any folder is made
    preflight(out_dirs={"--out": args.out}, out_files={"--timing-cache": args.timing_cache})  # before any export work
    exporter = BundleExporter(options(args))
    out = exporter.from_onnx(args.from_onnx) if args.from_onnx else exporter.from_checkpoint(args.checkpoint)
    try:
        exporter.build_engines(out)
    except EnginesNotBuilt as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NEEDS_TRT
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
