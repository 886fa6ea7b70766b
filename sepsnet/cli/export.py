"""``sepsnet-export``: checkpoint -> ONNX graphs (+ TensorRT engines) + manifest (DESIGN.md "Export bundle").

    sepsnet-export CKPT --out DIR [--config X] [--fp16] [--int8 --calib DIR|synthetic [--calib-method M]] [--plugin]
                   [--onnx-only] [--height H --width W] [--dynamic]
    sepsnet-export --from-onnx DIR [--out DIR2] [--fp16 | --int8] [--plugin]   # engines later, on the target

Exit codes: 0 done; 2 error (message on stderr); 3 (``EXIT_NEEDS_TRT``) the ONNX bundle is written and
valid but TensorRT engines were not built because this machine lacks TensorRT or an NVIDIA GPU (both
the checkpoint path and ``--from-onnx``).

Engine graphs (``precision``/``plugin`` -> files; TensorRT 11 builds ``engine_onnx``, TensorRT 10
``engine_onnx_trt10``, see ``trt_build``):
    fp32   dense.onnx                 instance.onnx          (both versions)
    fp16   dense.fp16.onnx            instance.fp16.onnx     (11)  | dense.onnx, instance.onnx + FP16 flag (10)
    int8   dense.fp16.int8.onnx       instance.onnx          (11)  | dense.int8.onnx + INT8/FP16 flags (10)
    --plugin: the instance graph is instance.plugin.onnx (fp32, fused first), instance.plugin.fp16.onnx
    for fp16 on 11 (converted after the fusion, SEPSNetRoiBlend and its box inputs kept fp32).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sepsnet.cli._common import run_cli
from sepsnet.errors import BundleError, ConfigError, EngineError
from sepsnet.export import bundle, calibration, trt_build

PLUGIN_NAME = "libsepsnet_plugins.so"
PLUGIN_SEARCH = ("build/plugins", "build", "cpp_plugins/build", "cpp_plugins/roi_blend/build", "sepsnet/ops")
EXIT_NEEDS_TRT = 3  # ONNX bundle written and valid; engines need TensorRT + an NVIDIA GPU
VARIANT_GRAPHS = ("dense.fp16.onnx", "instance.fp16.onnx", "dense.int8.onnx", "dense.fp16.int8.onnx",
                  "instance.plugin.onnx", "instance.plugin.fp16.onnx")
STALE_FILES = VARIANT_GRAPHS + ("dense.plan", "instance.plan", PLUGIN_NAME)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepsnet-export",
                                description="Checkpoint -> ONNX graphs (+ TensorRT engines) + manifest.json bundle.")
    p.add_argument("checkpoint", nargs="?", help="training checkpoint (.pth)")
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument("--config", help="YAML config (default: the config stored in the checkpoint)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="fp16 graph / engine (sensitive ops stay fp32)")
    prec.add_argument("--int8", action="store_true", help="int8 Q/DQ dense graph calibrated with ONNX Runtime")
    p.add_argument("--calib", metavar="DIR|synthetic",
                   help="--int8 calibration images: a folder of images, or a dataset root (its train split); "
                        "'synthetic': generated shapes, smoke tests only. Required with --int8")
    p.add_argument("--calib-count", type=int, default=32,
                   help="calibration frames, spread over the images (default 32)")
    p.add_argument("--calib-method", choices=calibration.METHODS, default=calibration.DEFAULT_METHOD,
                   help=f"activation range estimator for --int8 (default {calibration.DEFAULT_METHOD})")
    p.add_argument("--plugin", action="store_true", help="instance graph with one SEPSNetRoiBlend plugin node")
    p.add_argument("--plugin-lib", help=f"path of {PLUGIN_NAME} (default: searched in {', '.join(PLUGIN_SEARCH)})")
    p.add_argument("--onnx-only", action="store_true", help="write the ONNX bundle, build no TensorRT engine")
    p.add_argument("--height", type=int, help="input height (multiple of 32; default: padded min_size_test)")
    p.add_argument("--width", type=int, help="input width (multiple of 32; default: padded max_size_test)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch/height/width (profiles in the manifest)")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch with --dynamic (default 4)")
    p.add_argument("--from-onnx", metavar="DIR", help="build TensorRT engines for an existing ONNX bundle")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT workspace pool limit (GiB)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file, reused across builds (default: "
                                          "~/.cache/sepsnet/trt_timing_<TensorRT version>_<GPU>.cache)")
    return p.parse_args(argv)


def _precision(args: argparse.Namespace, default: str = "fp32") -> str:
    return "int8" if args.int8 else "fp16" if args.fp16 else default


def _find_plugin(args: argparse.Namespace, out: Path | None = None) -> Path:
    if args.plugin_lib:
        return Path(args.plugin_lib)
    env = os.environ.get("SEPSNET_PLUGIN_LIB")
    candidates = [Path(env)] if env else []
    candidates += [Path(d) / PLUGIN_NAME for d in PLUGIN_SEARCH]
    if out is not None:
        candidates.append(out / PLUGIN_NAME)  # the copy a bundle already holds (from an earlier build)
    for c in candidates:
        if c.is_file():
            return c
    raise EngineError(f"--plugin: {PLUGIN_NAME} (TensorRT plugin {trt_build.PLUGIN_OP}) not found (looked in "
                      f"{', '.join(str(c) for c in candidates)}); build it where a TensorRT SDK is installed "
                      "or pass --plugin-lib")


def _graph_entry(out: Path, onnx_name: str, engine_onnx: str, engine_onnx_trt10: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"onnx": onnx_name, "engine_onnx": engine_onnx,
                             "engine_onnx_trt10": engine_onnx_trt10, "plan": None}
    entry.update(bundle.tensor_specs(out / engine_onnx))
    return entry


def _is_plugin(manifest: dict[str, Any]) -> bool:
    inst = manifest["graphs"]["instance"]
    return any(".plugin." in str(inst.get(k) or "") for k in ("engine_onnx", "engine_onnx_trt10"))


def _referenced(graphs: dict[str, dict[str, Any]]) -> set[str]:
    return {str(g[k]) for g in graphs.values() for k in ("onnx", "engine_onnx", "engine_onnx_trt10", "plan")
            if g.get(k)}


def _clear_bundle(out: Path, keep: frozenset[str] = frozenset()) -> None:
    """Remove the manifest first (an interrupted export then has no manifest), then stale graphs/engines."""
    for name in (bundle.MANIFEST,) + STALE_FILES:
        if name not in keep and (out / name).exists():
            (out / name).unlink()


def write_engine_graphs(out: Path, prec: str, plugin: bool, calibrate: Callable[[], list[Any]],
                        calib_method: str = calibration.DEFAULT_METHOD) -> dict[str, dict[str, Any]]:
    """From ``out/dense.onnx`` + ``out/instance.onnx`` write the engine graphs of ``prec`` (+ the plugin
    rewrite) and return the manifest ``graphs`` entries (file table in the module docstring).

    The plugin rewrite runs on the fp32 instance graph; its fp16 form is converted afterwards, so
    the fp16 conversion never splits the RoiAlign/Softmax -> Mul pattern with Casts."""
    import onnx

    from sepsnet.export import plugin_rewrite, precision, surgery

    dense10 = dense11 = "dense.onnx"
    inst10 = inst11 = "instance.onnx"
    inst_model = None
    if plugin:
        inst_model, count = plugin_rewrite.rewrite_roi_blend(onnx.load(str(out / "instance.onnx")))
        surgery.save(inst_model, out / "instance.plugin.onnx")
        inst10 = inst11 = "instance.plugin.onnx"
        print(f"instance.plugin.onnx: {count} {plugin_rewrite.PLUGIN_OP} node(s) replace the RoiAlign+blend subgraph")
    if prec == "fp16":
        precision.to_fp16(out / "dense.onnx", out / "dense.fp16.onnx")
        inst11 = "instance.plugin.fp16.onnx" if plugin else "instance.fp16.onnx"
        precision.to_fp16(inst_model if inst_model is not None else out / inst10, out / inst11)
        dense11 = "dense.fp16.onnx"
    elif prec == "int8":
        batches = calibrate()
        for name, q in calibration.write_int8_dense_graphs(out, batches, calib_method).items():
            counts = precision.count_ops(q, "QuantizeLinear", "DequantizeLinear")
            print(f"{name}: {counts['QuantizeLinear']} Q / {counts['DequantizeLinear']} DQ nodes, "
                  f"calibrated ({calib_method}) on {len(batches)} frames")
        dense10, dense11 = "dense.int8.onnx", "dense.fp16.int8.onnx"
    return {"dense": _graph_entry(out, "dense.onnx", dense11, dense10),
            "instance": _graph_entry(out, "instance.onnx", inst11, inst10)}


def prove_stripped(out: Path, names: Sequence[str], aux: Any) -> None:
    """The strip proof (no aux weight by name or value) on every graph file written to the bundle."""
    import onnx

    from sepsnet.export import strip

    for name in names:
        proof = strip.assert_no_aux_weights(onnx.load(str(out / name)), aux, name)
        print(f"{name}: {proof['checked']} tensors hold none of the {proof['aux_tensors']} train-only weights")


def export_onnx_bundle(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Checkpoint -> cleaned/checked ONNX graphs (+ fp16/int8/plugin variants) + manifest."""
    import torch

    from sepsnet.config import load_config
    from sepsnet.export import onnx_export, strip
    from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint

    if not args.checkpoint:
        raise ConfigError("sepsnet-export needs a checkpoint (or --from-onnx DIR)")
    if not args.out:
        raise ConfigError("sepsnet-export needs --out DIR")
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
        preselect = onnx_export.dense_preselect(cfg, shape.dynamic)
        onnx_export.export_dense(model, cfg, out / "dense.onnx", shape, preselect=preselect)
        onnx_export.export_instance(model, cfg, out / "instance.onnx", shape)
    prec = _precision(args)

    def calibrate() -> list[Any]:
        return calibration.calibration_inputs(calibration.require_source(args.calib), cfg.data,
                                              None if shape.dynamic else (shape.height, shape.width),
                                              args.calib_count, split=cfg.data.train_split)

    graphs = write_engine_graphs(out, prec, args.plugin, calibrate, args.calib_method)
    prove_stripped(out, sorted(_referenced(graphs)), aux)
    n_max = shape.max_instances * shape.ranges()["batch"][2]
    content = bundle.manifest_content(
        cfg, ckpt.get("meta"), ranges=shape.ranges(), dynamic=shape.dynamic,
        instances={"min": 0, "opt": min(shape.max_instances, 32), "max": n_max}, precision=prec,
        opset=onnx_export.OPSET, graphs=graphs, plugin=None, preselect=preselect)
    bundle.write_manifest(out, content)
    print(f"wrote ONNX bundle {out} ({prec}): {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    return out, content


def build_engines(out: Path, manifest: dict[str, Any], args: argparse.Namespace) -> None:
    """Build dense.plan and instance.plan from the graphs this TensorRT version takes; rewrite the manifest."""
    trt, gpu = trt_build.check_environment()
    major = trt_build.trt_major(trt)
    plugin_name = None
    plugin_path: Path | None = None
    if args.plugin or _is_plugin(manifest):
        src = _find_plugin(args, out)
        plugin_path = out / PLUGIN_NAME
        if src.resolve() != plugin_path.resolve():
            shutil.copy2(src, plugin_path)
        plugin_name = PLUGIN_NAME
    cache = Path(args.timing_cache) if args.timing_cache else trt_build.default_timing_cache(str(trt.__version__), gpu)
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
        result = trt_build.build_engine(out / trt_build.engine_onnx_for(graph, major), out / f"{name}.plan",
                                        precision=graph_prec, profiles=profiles[name],
                                        workspace_gib=args.workspace_gib, timing_cache=cache,
                                        plugin_library=plugin_path)
        graph["plan"] = f"{name}.plan"
    assert result is not None
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "created", "files")}
    manifest["versions"] = bundle.software_versions()
    manifest["gpu"] = result.gpu
    manifest["plugin"] = plugin_name
    bundle.write_manifest(out, manifest)
    print(f"wrote TensorRT {result.trt_version} engines for {result.gpu} into {out}")


def _copy_bundle(src: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Copy the bundle ``src`` into ``out`` (missing or empty). A non-empty ``out`` is accepted only when
    it holds a copy of the same bundle (same fp32 graphs, e.g. an earlier ``--from-onnx src --out out``
    stopped by a missing TensorRT): its files are then overwritten and its other graphs/engines removed.
    Anything else is refused."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            other: dict[str, Any] | None = bundle.load_manifest(out)
        except BundleError:
            other = None
        fp32 = [g["onnx"] for g in manifest["graphs"].values()]
        same = other is not None and all(
            (other["files"].get(n) or {}).get("sha256") == manifest["files"][n]["sha256"] for n in fp32)
        if not same:
            raise BundleError(f"--out {out} is not empty and does not hold a copy of the bundle {src} "
                              "(different or no manifest): refusing to overwrite it; pass a new or empty folder, "
                              f"or omit --out to build the engines inside {src}")
    shutil.copytree(src, out, dirs_exist_ok=True)
    for name in STALE_FILES:  # graphs/engines of the earlier copy that this bundle does not have
        if name not in manifest["files"] and (out / name).is_file():
            (out / name).unlink()


def _needs_trt(out: Path, prec: str, exc: EngineError) -> int:
    flag = f" --{prec}" if prec != "fp32" else ""
    print(f"error: the ONNX bundle {out} is written and valid (usable with ONNX Runtime), but TensorRT "
          f"engines were not built: they need TensorRT + an NVIDIA GPU ({exc}). Build them later on the "
          f"target machine with `sepsnet-export --from-onnx {out}{flag}`, or pass --onnx-only.", file=sys.stderr)
    return EXIT_NEEDS_TRT


def from_onnx(args: argparse.Namespace) -> int:
    """Build engines for an existing ONNX bundle (optionally copied to --out first); the engine graphs are
    rewritten first when the precision or --plugin asks for other ones (the plugin choice of a bundle
    sticks). Without TensorRT/GPU: the rewritten bundle stays valid and the exit code is EXIT_NEEDS_TRT."""
    from sepsnet.config import config_from_dict

    src = Path(args.from_onnx)
    manifest = bundle.verify_bundle(src)
    out = Path(args.out) if args.out else src
    if out.resolve() != src.resolve():
        _copy_bundle(src, out, manifest)
        manifest = bundle.verify_bundle(out)
    prec = _precision(args, manifest["precision"])
    plugin = args.plugin or _is_plugin(manifest)
    if prec != manifest["precision"] or plugin != _is_plugin(manifest):
        inp = manifest["input"]
        if prec == "int8":
            calibration.require_source(args.calib)  # refuse before anything of the bundle is removed
        data = config_from_dict(manifest["config"], where=f"{out}/manifest.json").data

        def calibrate() -> list[Any]:
            return calibration.calibration_inputs(calibration.require_source(args.calib), data,
                                                  None if inp.get("dynamic") else (inp["height"], inp["width"]),
                                                  args.calib_count, split=data.train_split)

        _clear_bundle(out, keep=frozenset({PLUGIN_NAME}))  # manifest first: no half-valid bundle if interrupted
        graphs = write_engine_graphs(out, prec, plugin, calibrate, args.calib_method)
        manifest = {k: v for k, v in manifest.items() if k not in ("format", "created", "files")}
        manifest.update(precision=prec, graphs=graphs, gpu=None, plugin=None)
        bundle.write_manifest(out, manifest)
        print(f"rewrote the engine graphs of {out} for {prec}{' with the plugin' if plugin else ''}")
    try:
        trt_build.check_environment(hint=False)
    except EngineError as exc:
        return _needs_trt(out, prec, exc)
    build_engines(out, manifest, args)
    return 0


def main_args(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.calib and not args.int8:
        raise ConfigError("--calib only applies with --int8")
    if args.int8 and not args.from_onnx:
        calibration.require_source(args.calib)  # before any export work
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
        return _needs_trt(out, manifest["precision"], exc)
    build_engines(out, manifest, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(main_args, argv)


if __name__ == "__main__":
    sys.exit(main())
