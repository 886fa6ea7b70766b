"""Export bundle: ``manifest.json`` beside the graphs/engines (DESIGN.md "Export bundle").

Manifest schema (``format`` = ``sepsnet-bundle/1``)::

    format        "sepsnet-bundle/1"
    created       ISO-8601 UTC time
    precision     "fp32" | "fp16" | "int8"   (precision of the engine graphs / plans)
    opset         ONNX opset of the graphs
    classes       ClassMetadata.to_dict() (things/stuff: id, name, color) or generated names
    model         num_thing_classes, num_stuff_classes, num_bases, attn_size, mask_size,
                  strides, mask_score, silhouette_feature
    input         height, width, batch, dynamic (bool), ranges {batch, height, width: [min, opt, max]},
                  pixel_mean, pixel_std, size_divisibility, min_size_test, max_size_test
    instances     {min, opt, max}: the dynamic instance count range of instance graph/engine
    postprocess   every PostprocessConfig field (alpha, score_thresh, nms_thresh, ...)
    alpha         copy of postprocess.alpha (Eq. 4)
    preselect     {topk, score_thresh, padded}: the dense graph keeps min(topk, h*w) locations per
                  FPN level (best class prob * centerness above score_thresh; padded: exactly topk);
                  null: every location
    versions      torch, torchvision, onnx, onnxruntime, tensorrt (null when absent), sepsnet
    gpu           GPU name the plans were built on (null for an ONNX-only bundle)
    plugin        file name of the TensorRT plugin library or null
    engine        null, or what the plans need (``engine_guard``): {tensorrt: exact version,
                  compute_capability: "8.6", gpu, hardware_compatibility: none | ampere_plus,
                  version_compatible: bool}
    graphs        {"dense": G, "instance": G}; G = {onnx: fp32 graph file (ORT runs it),
                  engine_onnx: graph a TensorRT 11 (strongly typed) engine is built from
                  (fp32/fp16/int8 file), engine_onnx_trt10: graph TensorRT 10 builds with
                  builder flags (fp32-derived; absent in older bundles: engine_onnx),
                  plan: "dense.plan" or null, inputs/outputs: [{name, shape, dtype}]}
                  (shape entries are ints or dim names such as "instances")
    files         {relative path: {sha256, bytes}} for every other file in the bundle

Every file path is relative and stays inside the bundle. ``load_manifest`` validates the whole
manifest against this schema (``manifest_schema``), so a hand-edited or truncated one fails with a
BundleError naming the key. The manifest is written last and atomically, so a bundle with a manifest
is complete.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from sepsnet.errors import BundleError
from sepsnet.fileio import atomic_write_text

FORMAT = "sepsnet-bundle/1"  # schema: sepsnet.export.manifest_schema.SCHEMAS
MANIFEST = "manifest.json"
WRITTEN_KEYS = ("format", "created", "files")  # added by write_manifest


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def software_versions() -> dict[str, str | None]:
    """Versions of the libraries an exported graph or engine depends on (None when absent)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "sepsnet"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "unknown"))
        except Exception:  # tensorrt may fail with OSError/RuntimeError, not only ImportError
            out[name] = None
    return out


def tensor_specs(onnx_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, shapes (int or dim name) and dtypes of an ONNX graph."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def spec(values: Any) -> list[dict[str, Any]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            out.append({"name": v.name, "shape": dims,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
        return out

    init_names = {i.name for i in model.graph.initializer}
    return {"inputs": spec([i for i in model.graph.input if i.name not in init_names]),
            "outputs": spec(model.graph.output)}


def file_table(bundle_dir: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 + size of every file in the bundle except the manifest and temp files."""
    root = Path(bundle_dir)
    table: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST or p.name.startswith("."):
            continue
        table[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_manifest(bundle_dir: str | Path, content: dict[str, Any]) -> Path:
    """Add format/created/files to ``content`` and write ``manifest.json`` last, atomically."""
    root = Path(bundle_dir)
    manifest = {"format": FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    manifest.update(content)
    manifest["files"] = file_table(root)
    path = root / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a manifest (``path`` = bundle folder or manifest file) and validate it as a whole against the
    schema of its format version (:mod:`sepsnet.export.manifest_schema`): BundleError naming the key."""
    from sepsnet.export import manifest_schema

    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} at {path}: not an export bundle (run sepsnet-export first)")
    def refuse_constant(name: str) -> Any:  # NaN / Infinity: Python's json accepts them, JSON does not
        raise ValueError(f"non-finite number {name} (JSON has none)")

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{path}: unreadable manifest: {exc}") from None
    try:
        manifest_schema.validate(manifest)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    return manifest


def manifest_body(manifest: dict[str, Any]) -> dict[str, Any]:
    """A loaded manifest without the keys :func:`write_manifest` adds (format, created, files): the
    content to update and write again."""
    return {k: v for k, v in manifest.items() if k not in WRITTEN_KEYS}


def has_plans(manifest: dict[str, Any]) -> bool:
    """True when the bundle contains TensorRT engines."""
    return any(g.get("plan") for g in manifest.get("graphs", {}).values())


def verify_bundle(bundle_dir: str | Path, *, runtime: Any = None) -> dict[str, Any]:
    """Load and validate the manifest; check every listed file is inside the bundle (symlinks resolved),
    exists and has its sha256, and that every file a graph names is listed.

    With ``runtime`` (a :class:`sepsnet.export.engine_guard.Runtime`; the TensorRT runtime passes it)
    also refuse plans that runtime cannot run (engine guard). Returns the manifest.
    """
    from sepsnet.export import manifest_schema

    root = Path(bundle_dir)
    if root.is_file():
        root = root.parent
    manifest = load_manifest(root)
    files = manifest["files"]
    for rel, entry in files.items():
        p = root / rel
        if not manifest_schema.is_inside(root, rel):
            raise BundleError(f"{root}: file {rel!r} listed in the manifest leads outside the bundle (symlink)")
        if not p.is_file():
            raise BundleError(f"{root}: file {rel!r} listed in the manifest is missing")
        digest = sha256_file(p)
        if digest != entry.get("sha256"):
            raise BundleError(f"{root}: sha256 mismatch for {rel!r} (manifest {str(entry.get('sha256'))[:12]}..., "
                              f"file {digest[:12]}...): the file was modified or corrupted; re-export")
    for name, graph in manifest["graphs"].items():
        for key in ("onnx", "engine_onnx", "engine_onnx_trt10", "plan"):
            rel = graph.get(key)
            if rel and rel not in files:
                raise BundleError(f"{root}: graph {name!r} {key} file {rel!r} is not listed in the manifest files")
    if manifest.get("plugin") and manifest["plugin"] not in files:
        raise BundleError(f"{root}: plugin library {manifest['plugin']!r} is not in the bundle")
    if runtime is not None and has_plans(manifest):
        from sepsnet.export.engine_guard import check_plan_compatible

        check_plan_compatible(manifest, runtime, where=str(root))
    return manifest


def default_classes(num_things: int, num_stuff: int) -> dict[str, Any]:
    """Class table when the checkpoint has no metadata: generated names and colours."""
    def color(i: int) -> list[int]:
        return [(37 * i + 60) % 256, (91 * i + 120) % 256, (53 * i + 200) % 256]

    return {"things": [{"id": i + 1, "name": f"thing_{i}", "color": color(i)} for i in range(num_things)],
            "stuff": [{"id": num_things + i + 1, "name": f"stuff_{i}", "color": color(num_things + i)}
                      for i in range(num_stuff)]}


def input_spec(cfg: Any, ranges: dict[str, list[int]], dynamic: bool) -> dict[str, Any]:
    """The manifest ``input`` block: engine input size and ranges, normalisation, test-time resize."""
    d = cfg.data
    return {"height": ranges["height"][1], "width": ranges["width"][1], "batch": ranges["batch"][1],
            "dynamic": dynamic, "ranges": ranges, "input_format": d.input_format,
            "pixel_mean": list(d.pixel_mean), "pixel_std": list(d.pixel_std),
            "size_divisibility": d.size_divisibility, "min_size_test": d.min_size_test,
            "max_size_test": d.max_size_test}


def manifest_content(cfg: Any, classes: dict[str, Any] | None, *, ranges: dict[str, list[int]],
                     dynamic: bool, instances: dict[str, int], precision: str, opset: int,
                     graphs: dict[str, dict[str, Any]], plugin: str | None = None,
                     gpu: str | None = None, preselect: Any = None) -> dict[str, Any]:
    """Everything the runtime needs besides the files (see the module docstring)."""
    from dataclasses import asdict

    m = cfg.model
    return {
        "precision": precision,
        "opset": opset,
        "classes": classes or default_classes(m.num_thing_classes, m.num_stuff_classes),
        "model": {"num_thing_classes": m.num_thing_classes, "num_stuff_classes": m.num_stuff_classes,
                  "num_bases": m.blender.num_bases, "attn_size": m.blender.attn_size,
                  "mask_size": m.blender.mask_size, "sampling_ratio": m.blender.sampling_ratio,
                  "strides": list(m.fcos.strides), "fpn_channels": m.fpn_channels,
                  "mask_score": m.components.mask_score, "silhouette_feature": m.components.silhouette_feature},
        "input": input_spec(cfg, ranges, dynamic),
        "instances": instances,
        "postprocess": asdict(cfg.postprocess),
        "alpha": cfg.postprocess.alpha,
        "preselect": None if preselect is None else asdict(preselect),
        "versions": software_versions(),
        "gpu": gpu,
        "plugin": plugin,
        "engine": None,
        "graphs": graphs,
        "config": cfg.to_dict(),
    }
