"""``sepsnet-export``: checkpoint -> ONNX graphs (+ TensorRT engines) + manifest (DESIGN.md "Export bundle").

    sepsnet-export CKPT --out DIR [--config X] [--fp16] [--int8 [--calib DIR]] [--plugin]
                   [--onnx-only] [--height H --width W] [--dynamic]
    sepsnet-export --from-onnx DIR [--fp16 | --int8]      # build engines later, on the target
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from sepsnet.cli._common import run_cli
from sepsnet.errors import BundleError, ConfigError, EngineError
from sepsnet.export import bundle, trt_build

PLUGIN_NAME = "libsepsnet_plugins.so"
PLUGIN_SEARCH = ("build/plugins", "build", "cpp_plugins/build", "cpp_plugins/roi_blend/build", "sepsnet/ops")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepsnet-export",
                                description="Checkpoint -> ONNX graphs (+ TensorRT engines) + manifest.json bundle.")
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (.pth)")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 graph / engine (sensitive ops stay fp32)")
    prec.add_argument("--int8", action="store_true", help="int8 Q/DQ dense graph calibrated with ONNX Runtime")
    p.add_argument("--calib", help="folder of calibration images for --int8 (default: generated frames)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration frames (default 32)")
    p.add_argument("--plugin", action="store_true", help="instance graph with one SEPSNetRoiBlend plugin node")
    p.add_argument("--plugin-lib", help=f"path of {PLUGIN_NAME} (default: searched in {', '.join(PLUGIN_SEARCH)})")
    p.add_argument("--onnx-only", action="store_true", help="write the ONNX bundle, build no TensorRT engine")
    p.add_argument("--height", type=int, help="input height (multiple of 32; default: padded min_size_test)")
    p.add_argument("--width", type=int, help="input width (multiple of 32; default: padded max_size_test)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch/height/width (profiles in the manifest)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch with --dynamic (default 4)")
    p.add_argument("--from-onnx", metavar="DIR", help="build TensorRT engines for an existing ONNX bundle")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT workspace pool limit (GiB)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file, reused across builds "
                                          "(default: ~/.cache/sepsnet/trt_timing.cache)")
    return p.parse_args(argv)


def _precision(args: argparse.Namespace, default: str = "fp32") -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else default


def _find_plugin(args: argparse.Namespace) -> Path:
    if args.plugin_lib:
        return Path(args.plugin_lib)
    env = os.environ.get("SEPSNET_PLUGIN_LIB")
    candidates = [Path(env)] if env else []
    candidates += [Path(d) / PLUGIN_NAME for d in PLUGIN_SEARCH]
    for c in candidates:
        if c.is_file():
            return c
    raise EngineError(f"--plugin: {PLUGIN_NAME} not found (looked in {', '.join(str(c) for c in candidates)}); "
                      "build it where a TensorRT SDK is installed or pass --plugin-lib")


def rewrite_for_plugin(src: Path, dst: Path) -> None:
    """instance graph -> the same graph with RoiAlign+blend as one SEPSNetRoiBlend node."""
    try:
        from sepsnet.export import plugin_rewrite
    except ImportError as exc:
        raise EngineError(f"--plugin: sepsnet.export.plugin_rewrite is not available ({exc})") from None
    fn = getattr(plugin_rewrite, "rewrite_instance_graph", None)
    if fn is None:
        public = [n for n in dir(plugin_rewrite) if not n.startswith("_")]
        raise EngineError(f"--plugin: plugin_rewrite has no rewrite_instance_graph(src, dst) (has: {public})")
    fn(src, dst)
    if not dst.is_file():
        raise EngineError(f"--plugin: the rewrite did not write {dst}")


def _graph_entry(out: Path, onnx_name: str, engine_onnx: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"onnx": onnx_name, "engine_onnx": engine_onnx, "plan": None}
    entry.update(bundle.tensor_specs(out / engine_onnx))
    return entry


def _clear_bundle(out: Path) -> None:
    """Remove the manifest first (an interrupted export then has no manifest) and stale engines."""
    for name in [bundle.MANIFEST, "dense.plan", "instance.plan", "dense.fp16.onnx", "instance.fp16.onnx",
                 "dense.int8.onnx", "instance.plugin.onnx", PLUGIN_NAME]:
        if (out / name).exists():
            (out / name).unlink()


def export_onnx_bundle(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Checkpoint -> cleaned/checked ONNX graphs (+ fp16/int8/plugin variants) + manifest."""
    import torch

    from sepsnet.config import load_config
    from sepsnet.export import onnx_export, precision, strip
    from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint

    if not args.checkpoint:
        raise ConfigError("sepsnet-export needs a checkpoint (or --from-onnx DIR)")
    if not args.out:
        raise ConfigError("sepsnet-export needs --out DIR")
    if args.calib and not args.int8:
        raise ConfigError("--calib only applies with --int8")
    ckpt = load_checkpoint(args.checkpoint)
    if args.config:
        cfg = load_config(args.config)
        check_compatible(ckpt, cfg, args.checkpoint)
    else:
        cfg = checkpoint_config(ckpt, args.checkpoint)
    model, aux = strip.build_deploy_model(cfg, ckpt["model"], where=str(args.checkpoint))
    shape = onnx_export.default_shape(cfg, args.height, args.width, args.dynamic, args.max_batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_bundle(out)
    print(f"exporting {args.checkpoint} at {shape.height}x{shape.width}"
          f"{' (dynamic batch/H/W)' if shape.dynamic else ''}; stripped: {', '.join(aux.modules) or 'nothing'}")
    with torch.no_grad():
        dense = onnx_export.export_dense(model, cfg, out / "dense.onnx", shape)
        inst = onnx_export.export_instance(model, cfg, out / "instance.onnx", shape)
    for proto, name in ((dense, "dense.onnx"), (inst, "instance.onnx")):
        proof = strip.assert_no_aux_weights(proto, aux, name)
        print(f"{name}: onnx.checker ok, {proof['checked']} tensors hold none of {proof['aux_tensors']} aux weights")
    prec = _precision(args)
    dense_engine, inst_engine = "dense.onnx", "instance.onnx"
    if prec == "fp16":
        precision.to_fp16(out / "dense.onnx", out / "dense.fp16.onnx")
        precision.to_fp16(out / "instance.onnx", out / "instance.fp16.onnx")
        dense_engine, inst_engine = "dense.fp16.onnx", "instance.fp16.onnx"
    elif prec == "int8":
        batches = precision.calibration_batches(shape.height, shape.width, 1, cfg.data.pixel_mean,
                                                cfg.data.pixel_std, folder=args.calib, count=args.calib_count)
        q = precision.to_int8_qdq(out / "dense.onnx", out / "dense.int8.onnx", batches)
        counts = precision.count_ops(q, "QuantizeLinear", "DequantizeLinear")
        print(f"dense.int8.onnx: {counts['QuantizeLinear']} Q / {counts['DequantizeLinear']} DQ nodes, "
              f"calibrated on {sum(len(b) for b in batches)} {'images' if args.calib else 'generated frames'}")
        dense_engine = "dense.int8.onnx"
    if args.plugin:
        rewrite_for_plugin(out / inst_engine, out / "instance.plugin.onnx")
        inst_engine = "instance.plugin.onnx"
    graphs = {"dense": _graph_entry(out, "dense.onnx", dense_engine),
              "instance": _graph_entry(out, "instance.onnx", inst_engine)}
    n_max = shape.max_instances * shape.ranges()["batch"][2]
    content = bundle.manifest_content(
        cfg, ckpt.get("meta"), ranges=shape.ranges(), dynamic=shape.dynamic,
        instances={"min": 0, "opt": min(shape.max_instances, 32), "max": n_max}, precision=prec,
        opset=onnx_export.OPSET, graphs=graphs, plugin=None)
    bundle.write_manifest(out, content)
    print(f"wrote ONNX bundle {out} ({prec}): {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    return out, content


def build_engines(out: Path, manifest: dict[str, Any], args: argparse.Namespace) -> None:
    """Build dense.plan and instance.plan from the manifest's engine graphs; rewrite the manifest."""
    trt_build.check_environment()
    plugin_name = None
    plugin_path: Optional[Path] = None
    if args.plugin or str(manifest["graphs"]["instance"]["engine_onnx"]).endswith(".plugin.onnx"):
        src = _find_plugin(args)
        plugin_path = out / PLUGIN_NAME
        if src.resolve() != plugin_path.resolve():
            shutil.copy2(src, plugin_path)
        plugin_name = PLUGIN_NAME
    cache = Path(args.timing_cache) if args.timing_cache else Path.home() / ".cache" / "sepsnet" / "trt_timing.cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    ranges, m = manifest["input"]["ranges"], manifest["model"]
    attn = m["num_bases"] * m["attn_size"] ** 2
    bases_c = m["num_bases"] + (1 if m["silhouette_feature"] else 0)
    profiles = {"dense": trt_build.dense_profiles(ranges),
                "instance": trt_build.instance_profiles(ranges, manifest["instances"], attn, bases_c,
                                                        m["fpn_channels"])}
    prec = manifest["precision"]
    result = None
    for name in ("dense", "instance"):
        graph = manifest["graphs"][name]
        graph_prec = "fp32" if (name == "instance" and prec == "int8") else prec
        result = trt_build.build_engine(out / graph["engine_onnx"], out / f"{name}.plan", precision=graph_prec,
                                        profiles=profiles[name], workspace_gib=args.workspace_gib,
                                        timing_cache=cache, plugin_library=plugin_path)
        graph["plan"] = f"{name}.plan"
    assert result is not None
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "created", "files")}
    manifest["versions"] = bundle.software_versions()
    manifest["gpu"] = result.gpu
    manifest["plugin"] = plugin_name
    bundle.write_manifest(out, manifest)
    print(f"wrote TensorRT {result.trt_version} engines for {result.gpu} into {out}")


def from_onnx(args: argparse.Namespace) -> int:
    """Build engines for an existing ONNX bundle (optionally copied to --out first)."""
    from sepsnet.config import config_from_dict
    from sepsnet.export import precision

    src = Path(args.from_onnx)
    manifest = bundle.verify_bundle(src)
    out = Path(args.out) if args.out else src
    if out.resolve() != src.resolve():
        if out.exists() and any(out.iterdir()):
            raise BundleError(f"--out {out} exists and is not empty")
        shutil.copytree(src, out)
    prec = _precision(args, manifest["precision"])
    if prec != manifest["precision"]:
        cfg = config_from_dict(manifest["config"], where=f"{src}/manifest.json")
        graphs = manifest["graphs"]
        if prec == "fp16":
            precision.to_fp16(out / "dense.onnx", out / "dense.fp16.onnx")
            precision.to_fp16(out / "instance.onnx", out / "instance.fp16.onnx")
            graphs["dense"].update(_graph_entry(out, "dense.onnx", "dense.fp16.onnx"))
            graphs["instance"].update(_graph_entry(out, "instance.onnx", "instance.fp16.onnx"))
        elif prec == "int8":
            inp = manifest["input"]
            batches = precision.calibration_batches(inp["height"], inp["width"], 1, cfg.data.pixel_mean,
                                                    cfg.data.pixel_std, folder=args.calib, count=args.calib_count)
            precision.to_int8_qdq(out / "dense.onnx", out / "dense.int8.onnx", batches)
            graphs["dense"].update(_graph_entry(out, "dense.onnx", "dense.int8.onnx"))
            graphs["instance"].update(_graph_entry(out, "instance.onnx", "instance.onnx"))
        else:
            graphs["dense"].update(_graph_entry(out, "dense.onnx", "dense.onnx"))
            graphs["instance"].update(_graph_entry(out, "instance.onnx", "instance.onnx"))
        manifest["precision"] = prec
        bundle.write_manifest(out, {k: v for k, v in manifest.items() if k not in ("format", "created", "files")})
    build_engines(out, manifest, args)
    return 0


def main_args(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.from_onnx:
        if args.checkpoint:
            raise ConfigError("give either a checkpoint or --from-onnx DIR, not both")
        return from_onnx(args)
    out, manifest = export_onnx_bundle(args)
    if args.onnx_only:
        return 0
    try:
        trt_build.check_environment(hint=False)
    except EngineError as exc:
        flag = f" --{manifest['precision']}" if manifest["precision"] != "fp32" else ""
        print(f"error: the ONNX bundle {out} is written and valid (usable with ONNX Runtime), but TensorRT "
              f"engines were not built: they need TensorRT + an NVIDIA GPU ({exc}). Build them later on the "
              f"target machine with `sepsnet-export --from-onnx {out}{flag}`, or pass --onnx-only.",
              file=sys.stderr)
        return 3
    build_engines(out, manifest, args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
