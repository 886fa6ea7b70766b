"""The export pipeline behind ``sepsnet-export``: checkpoint or ONNX bundle -> engine graphs -> TensorRT plans.

:class:`BundleExporter` has one method per step (after the EngineBuilder of TensorRT's Python samples),
so the CLI is argument parsing plus four lines:

- :meth:`BundleExporter.from_checkpoint`: ONNX graphs (cleaned, strip-proved) + engine graphs + manifest;
- :meth:`BundleExporter.from_onnx`: an existing bundle, copied to ``out`` when asked, its engine graphs
  rewritten when the precision or the plugin choice changes;
- :meth:`BundleExporter.build_engines`: TensorRT plans + the manifest ``engine`` block
  (:mod:`engine_guard`), or :class:`EnginesNotBuilt` when this machine has no TensorRT / GPU.

Engine graphs (``precision``/``plugin`` -> files; TensorRT 11 builds ``engine_onnx``, TensorRT 10
``engine_onnx_trt10``, see ``trt_build``):
    fp32   dense.onnx                 instance.onnx          (both versions)
    fp16   dense.fp16.onnx            instance.fp16.onnx     (11)  | dense.onnx, instance.onnx + FP16 flag (10)
    int8   dense.fp16.int8.onnx       instance.onnx          (11)  | dense.int8.onnx + INT8/FP16 flags (10)
    --plugin: the instance graph is instance.plugin.onnx (fp32, fused first), instance.plugin.fp16.onnx
    for fp16 on 11 (converted after the fusion, SEPSNetRoiBlend and its box inputs kept fp32).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sepsnet.errors import BundleError, ConfigError, EngineError
from sepsnet.export import bundle, staging, trt_build

PLUGIN_NAME = "libsepsnet_plugins.so"
PLUGIN_SEARCH = ("build/plugins", "build", "cpp_plugins/build", "cpp_plugins/roi_blend/build", "sepsnet/ops")
VARIANT_GRAPHS = ("dense.fp16.onnx", "instance.fp16.onnx", "dense.int8.onnx", "dense.fp16.int8.onnx",
                  "instance.plugin.onnx", "instance.plugin.fp16.onnx")
PLAN_FILES = ("dense.plan", "instance.plan")
STALE_FILES = VARIANT_GRAPHS + PLAN_FILES + (PLUGIN_NAME,)
Batches = list[Any]


class EnginesNotBuilt(EngineError):
    """The ONNX bundle is written and valid, but this machine cannot build TensorRT engines."""


@dataclass
class ExportOptions:
    """Everything ``sepsnet-export`` can be asked (CLI flags of the same names)."""

    out: str | None = None
    config: str | None = None
    precision: str | None = None  # fp32 | fp16 | int8; None: fp32 for a checkpoint, the bundle's for --from-onnx
    calib: str | None = None  # folder of images, dataset root (train split) or "synthetic"
    calib_count: int = 32
    calib_method: str = "minmax"  # minmax | percentile | entropy (export.calibration.METHODS)
    plugin: bool = False
    plugin_lib: str | None = None
    onnx_only: bool = False
    height: int | None = None
    width: int | None = None
    dynamic: bool = False
    max_batch: int = 4
    workspace_gib: float = 4.0
    timing_cache: str | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False


def calibration_source(options: ExportOptions, data: Any, input_spec: dict[str, Any]) -> Callable[[], Batches]:
    """The int8 calibration frames for a bundle input (``data``: the DataConfig; ``input_spec``: the
    manifest ``input`` block), preprocessed by the predictor's own function: the one place the export
    pipeline asks for calibration data (both the checkpoint and the --from-onnx path)."""
    from sepsnet.export import calibration

    def batches() -> Batches:
        static = None if input_spec.get("dynamic") else (input_spec["height"], input_spec["width"])
        return calibration.calibration_inputs(calibration.require_source(options.calib), data, static,
                                              options.calib_count, split=data.train_split)

    return batches


def find_plugin(options: ExportOptions, out: Path | None = None) -> Path:
    """``--plugin-lib``, else ``$SEPSNET_PLUGIN_LIB``, else the build folders, else the bundle's own copy."""
    if options.plugin_lib:
        return Path(options.plugin_lib)
    env = os.environ.get("SEPSNET_PLUGIN_LIB")
    candidates = [Path(env)] if env else []
    candidates += [Path(d) / PLUGIN_NAME for d in PLUGIN_SEARCH]
    if out is not None:
        candidates.append(out / PLUGIN_NAME)  # the copy a bundle already holds (from an earlier build)
    for c in candidates:
        if c.is_file():
            return c
    raise EngineError(f"--plugin: {PLUGIN_NAME} (TensorRT plugin {trt_build.PLUGIN_OP}) not found (looked in "
                      f"{', '.join(str(c) for c in candidates)}); {trt_build.PLUGIN_BUILD_HINT}")


def is_plugin_bundle(manifest: dict[str, Any]) -> bool:
    inst = manifest["graphs"]["instance"]
    return any(".plugin." in str(inst.get(k) or "") for k in ("engine_onnx", "engine_onnx_trt10"))


def referenced_files(graphs: dict[str, dict[str, Any]]) -> set[str]:
    return {str(g[k]) for g in graphs.values() for k in ("onnx", "engine_onnx", "engine_onnx_trt10", "plan")
            if g.get(k)}


def _graph_entry(out: Path, onnx_name: str, engine_onnx: str, engine_onnx_trt10: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"onnx": onnx_name, "engine_onnx": engine_onnx,
                             "engine_onnx_trt10": engine_onnx_trt10, "plan": None}
    entry.update(bundle.tensor_specs(out / engine_onnx))
    return entry


def write_engine_graphs(out: Path, prec: str, plugin: bool, calibration: Callable[[], Batches],
                        calib_method: str = "minmax") -> dict[str, dict[str, Any]]:
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
        from sepsnet.export import calibration as calib

        batches = calibration()
        for name, q in calib.write_int8_dense_graphs(out, batches, calib_method).items():
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


def copy_bundle(src: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Copy the bundle ``src`` (its manifest's files) into ``out`` (missing or empty). A non-empty ``out``
    is accepted only when it holds a copy of the same bundle (same fp32 graphs, e.g. an earlier
    ``--from-onnx src --out out`` stopped by a missing TensorRT): its files are then replaced and its
    other graphs/engines removed. Anything else is refused."""
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
    # copied beside ``out`` and published at the end (an interrupted copy leaves ``out`` as it was);
    # publishing removes the graphs/engines of an earlier copy that this bundle does not have
    with staging.staged(out, stale=STALE_FILES) as work:
        for name in [*manifest["files"], bundle.MANIFEST]:
            shutil.copy2(src / name, work / name)


class BundleExporter:
    """One export run: ``from_checkpoint`` or ``from_onnx``, then ``build_engines``."""

    def __init__(self, options: ExportOptions) -> None:
        self.options = options
        if options.calib and options.precision != "int8":
            raise ConfigError("--calib only applies with --int8")
        if options.precision == "int8":
            from sepsnet.export.calibration import require_source

            require_source(options.calib)  # refused before any export work or any file of a bundle is removed
        if options.plugin_lib and not Path(options.plugin_lib).is_file():
            raise EngineError(f"--plugin-lib {options.plugin_lib}: no such file; {trt_build.PLUGIN_BUILD_HINT}")

    def from_checkpoint(self, checkpoint: str | None) -> Path:
        """Checkpoint -> cleaned/checked ONNX graphs (+ fp16/int8/plugin variants) + manifest; the bundle folder."""
        import torch

        from sepsnet.config import load_config
        from sepsnet.export import onnx_export, strip
        from sepsnet.model.weights import check_compatible, checkpoint_config, load_checkpoint

        opt = self.options
        if not checkpoint:
            raise ConfigError("sepsnet-export needs a checkpoint (or --from-onnx DIR)")
        if not opt.out:
            raise ConfigError("sepsnet-export needs --out DIR")
        ckpt = load_checkpoint(checkpoint)
        if opt.config:
            cfg = load_config(opt.config)
            check_compatible(ckpt, cfg, checkpoint)
        else:
            cfg = checkpoint_config(ckpt, checkpoint)
        model, aux = strip.build_deploy_model(cfg, ckpt["model"], where=str(checkpoint))
        shape = onnx_export.default_shape(cfg, opt.height, opt.width, opt.dynamic, opt.max_batch)
        out = Path(opt.out)
        print(f"exporting {checkpoint} at {shape.height}x{shape.width}"
              f"{' (dynamic batch/H/W)' if shape.dynamic else ''}; stripped: {', '.join(aux.modules) or 'nothing'}")
        # built beside --out and published at the end: a bundle already there stays usable meanwhile
        with staging.staged(out, stale=STALE_FILES) as work:
            with torch.no_grad():
                preselect = onnx_export.dense_preselect(cfg, shape.dynamic)
                onnx_export.export_dense(model, cfg, work / "dense.onnx", shape, preselect=preselect)
                onnx_export.export_instance(model, cfg, work / "instance.onnx", shape)
            prec = opt.precision or "fp32"
            input_spec = bundle.input_spec(cfg, shape.ranges(), shape.dynamic)
            graphs = write_engine_graphs(work, prec, opt.plugin, calibration_source(opt, cfg.data, input_spec),
                                         opt.calib_method)
            prove_stripped(work, sorted(referenced_files(graphs)), aux)
            n_max = shape.max_instances * shape.ranges()["batch"][2]
            content = bundle.manifest_content(
                cfg, ckpt.get("meta"), ranges=shape.ranges(), dynamic=shape.dynamic,
                instances={"min": 0, "opt": min(shape.max_instances, 32), "max": n_max}, precision=prec,
                opset=onnx_export.opset_for(cfg), graphs=graphs, plugin=None, preselect=preselect)
            bundle.write_manifest(work, content)
        print(f"wrote ONNX bundle {out} ({prec}): {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
        return out

    def from_onnx(self, src_dir: str) -> Path:
        """An existing ONNX bundle (copied to --out first when given), its engine graphs rewritten when the
        precision or --plugin asks for other ones (the plugin choice of a bundle sticks); the bundle folder."""
        opt = self.options
        src = Path(src_dir)
        manifest = bundle.verify_bundle(src)
        out = Path(opt.out) if opt.out else src
        if out.resolve() != src.resolve():
            copy_bundle(src, out, manifest)
            manifest = bundle.verify_bundle(out)
        prec = opt.precision or manifest["precision"]
        plugin = opt.plugin or is_plugin_bundle(manifest)
        if prec != manifest["precision"] or plugin != is_plugin_bundle(manifest):
            from sepsnet.config import config_from_dict

            data = config_from_dict(manifest["config"], where=f"{out}/manifest.json").data
            # rewritten beside the bundle and published at the end: the bundle stays usable meanwhile
            with staging.staged(out, stale=STALE_FILES) as work:
                staging.seed_from(out, work, [n for n in manifest["files"] if n not in VARIANT_GRAPHS + PLAN_FILES])
                graphs = write_engine_graphs(work, prec, plugin, calibration_source(opt, data, manifest["input"]),
                                             opt.calib_method)
                content = bundle.manifest_body(manifest)
                content.update(precision=prec, graphs=graphs, gpu=None, plugin=None, engine=None)
                bundle.write_manifest(work, content)
            print(f"rewrote the engine graphs of {out} for {prec}{' with the plugin' if plugin else ''}")
        return out

    def build_engines(self, out: Path) -> None:
        """dense.plan + instance.plan from the graphs this TensorRT version takes, then the manifest (with
        the ``engine`` block). ``--onnx-only``: nothing. EnginesNotBuilt when TensorRT or the GPU is missing."""
        opt = self.options
        if opt.onnx_only:
            return
        manifest = bundle.verify_bundle(out)
        try:
            trt, gpu = trt_build.check_environment(hint=False)
        except EngineError as exc:
            from sepsnet.export.engine_guard import rebuild_command

            raise EnginesNotBuilt(
                f"the ONNX bundle {out} is written and valid (usable with ONNX Runtime), but TensorRT engines were "
                f"not built: they need TensorRT + an NVIDIA GPU ({exc}). Build them later on the target machine "
                f"with `{rebuild_command(str(out), self._wanted(manifest))}`, or pass --onnx-only.") from None
        major = trt_build.trt_major(trt)
        # built beside the bundle and published at the end: the ONNX bundle stays valid during the build
        with staging.staged(out, stale=PLAN_FILES) as work:
            staging.seed_from(out, work, [n for n in manifest["files"] if n not in PLAN_FILES])
            plugin_name, plugin_path = None, None
            if opt.plugin or is_plugin_bundle(manifest):
                src = find_plugin(opt, out)
                plugin_path = work / PLUGIN_NAME
                if plugin_path.exists():
                    plugin_path.unlink()  # a link to the bundle's copy: never written through
                shutil.copy2(src, plugin_path)
                plugin_name = PLUGIN_NAME
            cache = (Path(opt.timing_cache) if opt.timing_cache
                     else trt_build.default_timing_cache(str(trt.__version__), gpu))
            ranges, m = manifest["input"]["ranges"], manifest["model"]
            attn = m["num_bases"] * m["attn_size"] ** 2
            bases_c = m["num_bases"] + (1 if m["silhouette_feature"] else 0)
            profiles = {"dense": trt_build.dense_profiles(ranges),
                        "instance": trt_build.instance_profiles(ranges, manifest["instances"], attn, bases_c,
                                                                m["fpn_channels"])}
            prec = manifest["precision"]
            content = bundle.manifest_body(manifest)
            result = None
            for name in ("dense", "instance"):
                graph = content["graphs"][name]
                graph_prec = "fp32" if (name == "instance" and prec == "int8") else prec
                result = trt_build.build_engine(work / trt_build.engine_onnx_for(graph, major), work / f"{name}.plan",
                                                precision=graph_prec, profiles=profiles[name],
                                                workspace_gib=opt.workspace_gib, timing_cache=cache,
                                                plugin_library=plugin_path, hardware_compatible=opt.hardware_compatible,
                                                version_compatible=opt.version_compatible)
                graph["plan"] = f"{name}.plan"
            assert result is not None
            content.update(versions=bundle.software_versions(), gpu=result.target.gpu, plugin=plugin_name,
                           engine=result.target.to_dict())
            bundle.write_manifest(work, content)
        print(f"wrote TensorRT {result.target.tensorrt} engines for {result.target.gpu} (compute capability "
              f"{result.target.compute_capability}) into {out}")

    def _wanted(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest as the engines asked for would record it (for the rebuild command)."""
        level = "ampere_plus" if self.options.hardware_compatible else "none"
        return {**manifest, "engine": {"hardware_compatibility": level,
                                       "version_compatible": self.options.version_compatible}}
