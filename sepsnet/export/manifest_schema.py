"""Schema of a bundle's ``manifest.json``, checked as a whole when a bundle is loaded (issue 16 item 5).

A hand-edited or truncated manifest must fail at load time with one :class:`BundleError` naming the
key, not later as a ``KeyError`` deep in the runtime. Three layers, all run by :func:`validate`:

1. JSON Schema (``jsonschema``, draft 2020-12) per format version (:data:`SCHEMAS`): every required
   key, its type and range, unknown keys refused (``postprocess`` keys are the
   :class:`~sepsnet.config.PostprocessConfig` fields, so a new field is picked up automatically).
2. File paths (``files`` keys, graph ``onnx``/``engine_onnx``/``engine_onnx_trt10``/``plan``, ``plugin``)
   are relative POSIX paths that stay inside the bundle: no absolute path, drive, backslash, ``..``.
   (:func:`sepsnet.export.bundle.verify_bundle` also resolves them, so a symlink cannot lead out.)
3. Cross-field rules: ``[min, opt, max]`` ranges ordered, ``alpha`` equal to ``postprocess.alpha``,
   ``config`` and ``postprocess`` accepted by the config validation (:func:`sepsnet.config.config_from_dict`).
   (Plans without an ``engine`` block load, for ONNX Runtime; the engine guard refuses to run them.)
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import PurePosixPath
from typing import Any

from sepsnet.errors import BundleError

FORMAT_V1 = "sepsnet-bundle/1"
PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")
GRAPH_FILE_KEYS = ("onnx", "engine_onnx", "engine_onnx_trt10", "plan")

_INT = {"type": "integer"}
_POS = {"type": "integer", "minimum": 1}
_NONNEG = {"type": "integer", "minimum": 0}
_STR = {"type": "string", "minLength": 1}
_PATH = {"type": "string", "minLength": 1}  # containment is checked by check_relative_path
_RANGE = {"type": "array", "items": _POS, "minItems": 3, "maxItems": 3}


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": extra}


def _postprocess_schema() -> dict[str, Any]:
    """Every PostprocessConfig field required, no other key (types/ranges: config validation)."""
    from sepsnet.config import PostprocessConfig

    names = [f.name for f in dataclasses.fields(PostprocessConfig)]
    return _obj({n: {"type": ["number", "integer"]} for n in names})


_CLASS = _obj({"id": _NONNEG, "name": {"type": "string"},
               "color": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                         "minItems": 3, "maxItems": 3}}, required=["id", "name"], extra=True)
_TENSOR = _obj({"name": _STR, "shape": {"type": "array", "items": {"type": ["integer", "string"]}},
                "dtype": _STR})
_GRAPH = _obj({"onnx": _PATH, "engine_onnx": _PATH, "engine_onnx_trt10": _PATH,
               "plan": {"anyOf": [_PATH, {"type": "null"}]},
               "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
               "outputs": {"type": "array", "items": _TENSOR, "minItems": 1}},
              required=["onnx", "engine_onnx", "plan", "inputs", "outputs"])
# what the engine guard compares (sepsnet.export.engine_guard); null for an ONNX-only bundle
_ENGINE = _obj({"tensorrt": {"type": "string", "pattern": r"^\d+\.\d+(\.\d+)*$"},
                "compute_capability": {"type": "string", "pattern": r"^\d+\.\d+$"},
                "gpu": {"type": "string"},
                "hardware_compatibility": {"enum": list(HARDWARE_LEVELS)},
                "version_compatible": {"type": "boolean"}})


def _schema_v1() -> dict[str, Any]:
    return _obj({
        "format": {"const": FORMAT_V1},
        "created": {"type": "string"},
        "precision": {"enum": list(PRECISIONS)},
        "opset": {"type": "integer", "minimum": 7, "maximum": 99},
        "classes": _obj({"things": {"type": "array", "items": _CLASS, "minItems": 1},
                         "stuff": {"type": "array", "items": _CLASS}}),
        "model": _obj({"num_thing_classes": _POS, "num_stuff_classes": _NONNEG, "num_bases": _POS,
                       "attn_size": _POS, "mask_size": _POS, "sampling_ratio": _NONNEG,
                       "strides": {"type": "array", "items": _POS, "minItems": 1}, "fpn_channels": _POS,
                       "mask_score": {"type": "boolean"}, "silhouette_feature": {"type": "boolean"}}),
        "input": _obj({"height": _POS, "width": _POS, "batch": _POS, "dynamic": {"type": "boolean"},
                       "ranges": _obj({"batch": _RANGE, "height": _RANGE, "width": _RANGE}),
                       "pixel_mean": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
                       "pixel_std": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                                     "minItems": 3, "maxItems": 3},
                       "size_divisibility": _POS, "min_size_test": _POS, "max_size_test": _POS,
                       "input_format": {"enum": ["RGB", "BGR"]}},
                      required=["height", "width", "batch", "dynamic", "ranges", "pixel_mean", "pixel_std",
                                "size_divisibility", "min_size_test", "max_size_test"]),
        "instances": _obj({"min": _NONNEG, "opt": _NONNEG, "max": _POS}),
        "postprocess": _postprocess_schema(),
        "alpha": {"type": "number", "minimum": 0, "maximum": 1},
        "preselect": {"anyOf": [{"type": "null"},
                                _obj({"topk": _POS, "score_thresh": {"type": "number", "minimum": 0, "maximum": 1},
                                      "padded": {"type": "boolean"}})]},
        "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "gpu": {"type": ["string", "null"]},
        "plugin": {"anyOf": [_PATH, {"type": "null"}]},
        "engine": {"anyOf": [{"type": "null"}, _ENGINE]},
        "graphs": _obj({"dense": _GRAPH, "instance": _GRAPH}),
        "files": {"type": "object",
                  "additionalProperties": _obj({"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                                                "bytes": _NONNEG})},
        "config": {"type": "object"},
    }, required=["format", "precision", "opset", "classes", "model", "input", "instances", "postprocess",
                 "alpha", "versions", "gpu", "plugin", "graphs", "files", "config"])


# format version -> schema factory; a new format adds an entry (and load_manifest reads both)
SCHEMAS = {FORMAT_V1: _schema_v1}


def _key(path: Any) -> str:
    """``deque(['graphs', 'dense', 'onnx'])`` -> ``graphs.dense.onnx``; list indices as ``[i]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(error: Any) -> tuple[str, str]:
    """(key, problem) for a jsonschema ValidationError, naming the missing/unknown key itself."""
    base = list(error.absolute_path)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return _key(base + missing[:1]), "is missing"
    if error.validator == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        return (_key(base + unknown[:1]),
                f"is not a known key (allowed here: {', '.join(sorted(allowed))})")
    if error.validator in ("anyOf", "oneOf") and error.context:
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return _describe(deepest)
        kinds = [c.validator_value for c in error.context if c.validator == "type"]
        if kinds:
            return _key(base), f"{error.instance!r} is not of type {' or '.join(map(str, kinds))}"
    return _key(base), error.message


def check_relative_path(key: str, value: Any) -> None:
    """A bundle file path: relative, POSIX, no ``..``/empty/``.`` parts, no drive or backslash."""
    text = str(value)
    parts = text.split("/")
    if (not text or text.startswith("/") or "\\" in text or re.match(r"^[A-Za-z]:", text) or "\0" in text
            or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"key {key!r}: {text!r} is not a relative path inside the bundle "
                          "(absolute paths, '..' and backslashes are refused)")


def file_paths(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, path) of every file path the manifest names."""
    out = [(f"files.{rel}", rel) for rel in manifest.get("files", {})]
    for name, graph in manifest.get("graphs", {}).items():
        out += [(f"graphs.{name}.{k}", graph[k]) for k in GRAPH_FILE_KEYS if graph.get(k)]
    if manifest.get("plugin"):
        out.append(("plugin", manifest["plugin"]))
    return out


def _check_ranges(manifest: dict[str, Any]) -> None:
    inp = manifest["input"]
    for axis, values in inp["ranges"].items():
        if not values[0] <= values[1] <= values[2]:
            raise BundleError(f"key 'input.ranges.{axis}': {values} is not [min, opt, max] with min <= opt <= max")
        if inp[axis] != values[1]:
            raise BundleError(f"key 'input.{axis}': {inp[axis]} differs from input.ranges.{axis} opt {values[1]}")
    if not inp["dynamic"] and any(v[0] != v[2] for v in inp["ranges"].values()):
        raise BundleError("key 'input.ranges': a static bundle (input.dynamic false) has min == max on every axis")
    n = manifest["instances"]
    if not n["min"] <= n["opt"] <= n["max"]:
        raise BundleError(f"key 'instances': {n} is not min <= opt <= max")
    if manifest["alpha"] != manifest["postprocess"]["alpha"]:
        raise BundleError(f"key 'alpha': {manifest['alpha']} differs from postprocess.alpha "
                          f"{manifest['postprocess']['alpha']}")
    if len(manifest["model"]["strides"]) < 1:
        raise BundleError("key 'model.strides' is empty")


def _check_config(manifest: dict[str, Any]) -> None:
    """``config`` and ``postprocess`` through the one config validation (types, ranges, unknown keys)."""
    from sepsnet.config import config_from_dict
    from sepsnet.errors import ConfigError

    for prefix, raw in (("config.", manifest["config"]), ("", {"postprocess": manifest["postprocess"]})):
        try:
            config_from_dict(raw, where="manifest")
        except ConfigError as exc:
            msg = str(exc).removeprefix("manifest: ")
            m = re.match(r"^([\w.\[\]]+):? (.*)$", msg)
            key, rest = (m.group(1), m.group(2)) if m else ("", msg)
            raise BundleError(f"key {(prefix + key).rstrip('.') or 'config'!r}: {rest}") from None


def validate(manifest: Any) -> None:
    """Check a parsed manifest against the schema of its format version; BundleError naming the key."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(manifest, dict):
        raise BundleError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt not in SCHEMAS:
        raise BundleError(f"unknown bundle format version {fmt!r}; this sepsnet reads "
                          f"{', '.join(repr(k) for k in SCHEMAS)}. Re-export the bundle with this version of "
                          "sepsnet-export.")
    error = best_match(Draft202012Validator(SCHEMAS[fmt]()).iter_errors(manifest))
    if error is not None:
        key, problem = _describe(error)
        raise BundleError(f"key {key!r} {problem}" if problem.startswith("is ") else f"key {key!r}: {problem}")
    for key, rel in file_paths(manifest):
        check_relative_path(key, rel)
    _check_ranges(manifest)
    _check_config(manifest)


def is_inside(root: Any, rel: str) -> bool:
    """Whether ``root/rel`` resolves (symlinks followed) to a path inside ``root``."""
    from pathlib import Path

    base = Path(root).resolve()
    target = (base / PurePosixPath(rel)).resolve()
    return target == base or base in target.parents
