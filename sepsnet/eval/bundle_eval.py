"""Evaluate an export bundle like a checkpoint, and compare them (``sepsnet-eval --bundle / --compare``).

A bundle is scored through ``PanopticPredictor`` (:func:`sepsnet.eval.evaluator.evaluate_predictor`): the
frame goes in at its original size, the bundle's input policy (static size or dynamic), engines and the
shared post-processing produce the result, exactly as in deployment. Every graph a TensorRT build would
use is measured with ONNX Runtime, which runs the fp16 and the Q/DQ int8 graphs on CPU and CUDA:

    fp32                   graphs.*.onnx                (what the ONNX Runtime predictor runs)
    <precision>, TRT 11    graphs.*.engine_onnx         (strongly typed: the graph carries the precision)
    <precision>, TRT 10    graphs.*.engine_onnx_trt10   (when it differs from the fp32 graphs: int8 Q/DQ)

A TensorRT 10 fp16 engine is built from the fp32 graph with the FP16 flag: no ONNX graph holds its
precision, so only the TensorRT backend (``--backend trt``) measures it. A plugin instance graph
(``SEPSNetRoiBlend``) needs TensorRT; ONNX Runtime runs the bundle's own plain instance graph of the
same precision instead, else the fp32 one (said in the row's note).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sepsnet.errors import BundleError, ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
METRIC_KEYS = ("PQ", "PQ_th", "PQ_st", "mask_AP")


@dataclass
class GraphSet:
    """One pair of graphs of a bundle to score, and what it stands for."""

    name: str  # e.g. "int8 (TensorRT 11 graph)"
    precision: str
    dense: str
    instance: str
    backend: str = "ort"
    notes: list[str] = field(default_factory=list)

    def graphs(self) -> dict[str, str] | None:
        return None if self.backend == "trt" else {"dense": self.dense, "instance": self.instance}


def _plain_instance(manifest: dict[str, Any], key: str) -> tuple[str, list[str]]:
    """The instance graph of ``key``, or the closest graph ONNX Runtime can run when it is a plugin graph."""
    inst = manifest["graphs"]["instance"]
    name = inst.get(key) or inst["onnx"]
    if ".plugin." not in name:
        return name, []
    plain = name.replace(".plugin", "")
    if plain not in manifest["files"]:
        plain = inst["onnx"]
    return plain, [f"{name} needs the TensorRT plugin; ONNX Runtime ran {plain}"]


def graph_sets(manifest: dict[str, Any]) -> list[GraphSet]:
    """Every distinct graph pair of the bundle that ONNX Runtime can score (module docstring table)."""
    dense = manifest["graphs"]["dense"]
    prec = manifest["precision"]
    sets = [GraphSet("fp32", "fp32", dense["onnx"], manifest["graphs"]["instance"]["onnx"])]
    if prec == "fp32":
        return sets
    for key, trt in (("engine_onnx", "11"), ("engine_onnx_trt10", "10")):
        d = dense.get(key) or dense["onnx"]
        i, notes = _plain_instance(manifest, key)
        if any((s.dense, s.instance) == (d, i) for s in sets):
            continue  # TensorRT 10 fp16: the fp32 graphs + a builder flag
        sets.append(GraphSet(f"{prec} (TensorRT {trt} graph)", prec, d, i, notes=notes))
    return sets


def select(manifest: dict[str, Any], precision: str | None, backend: str = "ort", trt: str = "11") -> GraphSet:
    """The graph set ``sepsnet-eval --bundle --precision P [--trt-graph 10|11]`` scores (default: what the
    predictor runs with that backend: fp32 graphs on ONNX Runtime, the plans on TensorRT)."""
    have = manifest["precision"]
    if backend == "trt":
        if precision not in (None, have):
            raise BundleError(f"the bundle's TensorRT plans are {have}, not {precision}; measure {precision} "
                              f"with --backend ort or rebuild: `sepsnet-export --from-onnx DIR --{precision}`")
        return GraphSet(f"{have} (TensorRT plans)", have, str(manifest["graphs"]["dense"].get("plan")),
                        str(manifest["graphs"]["instance"].get("plan")), backend="trt")
    if backend != "ort":
        raise ConfigError(f"--backend must be ort or trt, got {backend!r}")
    precision = precision or "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in ("fp32", have):
        how = " --calib DIR" if precision == "int8" else ""
        raise BundleError(f"the bundle holds fp32 and {have} graphs, not {precision}: write them with "
                          f"`sepsnet-export --from-onnx BUNDLE --out NEW --{precision}{how}`")
    sets = [s for s in graph_sets(manifest) if s.precision == precision]
    if precision == "fp32":
        return sets[0]
    wanted = f"(TensorRT {trt} graph)"
    for s in sets:
        if s.name.endswith(wanted):
            return s
    raise BundleError(f"the bundle has no separate {precision} graph for TensorRT {trt} "
                      f"(TensorRT 10 builds {precision} from the fp32 graph with a flag; use --trt-graph 11)")


def input_desc(manifest: dict[str, Any]) -> str:
    inp = manifest["input"]
    return "dynamic" if inp.get("dynamic") else f"static {inp['height']}x{inp['width']}"


def evaluate_bundle(bundle: str | Path, graph_set: GraphSet, dataset: Any, cfg: Any, *, threads: int | None = None,
                    out_dir: str | Path | None = None, max_images: int | None = None, with_ap: bool = True,
                    boundary_ratio: float | None = None, skip_bad: bool | None = None) -> dict[str, Any]:
    """Metrics of ``graph_set`` of ``bundle`` on ``dataset`` (``evaluate_predictor``)."""
    from sepsnet.engines.predictor import PanopticPredictor
    from sepsnet.eval.evaluator import evaluate_predictor

    predictor = PanopticPredictor.from_bundle(bundle, backend=graph_set.backend, threads=threads,
                                              graphs=graph_set.graphs())
    return evaluate_predictor(predictor, dataset, cfg, out_dir=out_dir, max_images=max_images, with_ap=with_ap,
                              boundary_ratio=boundary_ratio, skip_bad=skip_bad)


def row(name: str, metrics: dict[str, Any], ref: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """One table row: the metrics (PQ in %, like the tables of the paper) and their deltas to ``ref``."""
    out: dict[str, Any] = {"name": name, **extra}
    for key in METRIC_KEYS + ("PQ_boundary",):
        if key in metrics:
            out[key] = 100.0 * float(metrics[key])
            if ref is not None and key in ref:
                out[f"delta_{key}"] = 100.0 * (float(metrics[key]) - float(ref[key]))
    out["images"] = metrics.get("images")
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`row` dicts (deltas against the first row)."""
    head = f"{'':<34}{'PQ':>8}{'PQ_th':>8}{'PQ_st':>8}{'mask AP':>9}{'dPQ':>8}{'dPQ_th':>8}{'dPQ_st':>8}{'dAP':>8}"
    lines = [head, "-" * len(head)]

    def fmt(r: dict[str, Any], key: str, width: int) -> str:
        v = r.get(key)
        return f"{v:>{width}.2f}" if isinstance(v, (int, float)) and v == v else f"{'-':>{width}}"

    for r in rows:
        lines.append(f"{r['name'][:33]:<34}{fmt(r, 'PQ', 8)}{fmt(r, 'PQ_th', 8)}{fmt(r, 'PQ_st', 8)}"
                     f"{fmt(r, 'mask_AP', 9)}{fmt(r, 'delta_PQ', 8)}{fmt(r, 'delta_PQ_th', 8)}"
                     f"{fmt(r, 'delta_PQ_st', 8)}{fmt(r, 'delta_mask_AP', 8)}")
    notes = [f"  {r['name']}: {n}" for r in rows for n in r.get("notes", [])]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


def compare(checkpoint_metrics: dict[str, Any], bundle: str | Path, manifest: dict[str, Any], dataset: Any,
            cfg: Any, *, backend: str = "ort", threads: int | None = None, out_dir: str | Path | None = None,
            **eval_kw: Any) -> dict[str, Any]:
    """The comparison table: the checkpoint's metrics, then every graph set of the bundle (and its TensorRT
    plans with ``backend="trt"``), each with deltas to the checkpoint."""
    rows = [row("checkpoint (PyTorch)", checkpoint_metrics, None, graphs=None, notes=[])]
    sets = graph_sets(manifest)
    if backend == "trt":
        sets.append(select(manifest, None, "trt"))
    for s in sets:
        sub = Path(out_dir) / s.name.split(" ")[0] if out_dir else None
        metrics = evaluate_bundle(bundle, s, dataset, cfg, threads=threads, out_dir=sub, **eval_kw)
        rows.append(row(s.name, metrics, checkpoint_metrics, graphs={"dense": s.dense, "instance": s.instance},
                        notes=list(s.notes)))
    return {"bundle": str(bundle), "input": input_desc(manifest), "precision": manifest["precision"],
            "rows": rows}


def save(table: dict[str, Any], path: str | Path) -> Path:
    from sepsnet.fileio import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(table, indent=2) + "\n")
    return path
