"""PQ / SQ / RQ from the per-category sums (reference ``PQStat.pq_average``) and the text table."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sepsnet.eval.pq_core import PQStat


def pq_average(stat: PQStat, categories: Mapping[int, Mapping[str, Any]],
               isthing: bool | None) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """Mean PQ/SQ/RQ over categories with any tp/fp/fn (reference ``PQStat.pq_average``)."""
    pq = sq = rq = 0.0
    n = 0
    per_class: dict[int, dict[str, float]] = {}
    for label, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        k = stat.cat_index[label]
        iou, tp, fp, fn = float(stat.iou[k]), int(stat.tp[k]), int(stat.fp[k]), int(stat.fn[k])
        if tp + fp + fn == 0:
            per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        n += 1
        denom = tp + 0.5 * fp + 0.5 * fn
        per_class[label] = {"pq": iou / denom, "sq": iou / tp if tp else 0.0, "rq": tp / denom}
        pq += per_class[label]["pq"]
        sq += per_class[label]["sq"]
        rq += per_class[label]["rq"]
    if n == 0:  # the reference divides by zero here; we report zeros
        return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def summarize(stat: PQStat, categories: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """``{'All'|'Things'|'Stuff': {pq, sq, rq, n}, 'per_class': {cat_id: {pq, sq, rq}}}``."""
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = pq_average(stat, categories, isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def format_table(results: Mapping[str, Any]) -> str:
    """The reference's text table (PQ/SQ/RQ in percent, N categories)."""
    lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format("", "PQ", "SQ", "RQ", "N"), "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
            name, 100 * r["pq"], 100 * r["sq"], 100 * r["rq"], r["n"]))
    return "\n".join(lines)
