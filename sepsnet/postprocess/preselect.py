"""The dense engine's per-level location pre-selection, as one typed value shared by the model,
the export, the bundle manifest and the post-processing (DESIGN "Inference split", step 1).

Lives here, not in ``sepsnet.model``, so post-processing and the runtime never import the model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sepsnet.errors import ConfigError


@dataclass(frozen=True)
class Preselect:
    """Per-level location pre-selection baked into the dense engine: attention vectors for the
    top-k candidates only. ``topk``/``score_thresh`` are the post-processing
    ``pre_nms_topk``/``score_thresh`` of the export. ``padded``: every level keeps exactly
    ``topk`` entries (levels smaller than that are padded with zero-score copies), so TopK's k
    stays a constant under dynamic height/width (TensorRT takes only constant k); otherwise a
    level keeps ``min(topk, h*w)``."""

    topk: int
    score_thresh: float
    padded: bool = False

    @classmethod
    def coerce(cls, value: Preselect | Mapping[str, Any] | None, where: str = "preselect") -> Preselect | None:
        """None, a Preselect, or the manifest's mapping ``{topk, score_thresh, padded}`` -> Preselect
        (ConfigError naming ``where`` and the bad key otherwise)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping {{topk, score_thresh, padded}}, got {type(value).__name__}")
        unknown = sorted(set(value) - {"topk", "score_thresh", "padded"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (topk, score_thresh, padded)")
        try:
            topk, thresh, padded = int(value["topk"]), float(value["score_thresh"]), value.get("padded", False)
        except KeyError as exc:
            raise ConfigError(f"{where}: missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: topk must be an integer and score_thresh a number, "
                              f"got {dict(value)}") from None
        if topk < 1 or not isinstance(padded, bool):
            raise ConfigError(f"{where}: topk must be >= 1 and padded a boolean, got {dict(value)}")
        return cls(topk=topk, score_thresh=thresh, padded=padded)

    def to_dict(self) -> dict[str, Any]:
        """The manifest form."""
        return asdict(self)


def check_preselect(preselect: Preselect | Mapping[str, Any] | None, pp: Any) -> None:
    """A pre-selecting dense engine is exact only for ``pre_nms_topk <= topk`` and
    ``score_thresh >= `` its threshold; ConfigError otherwise."""
    sel = Preselect.coerce(preselect)
    if sel is None:
        return
    if pp.pre_nms_topk > sel.topk or pp.score_thresh < sel.score_thresh:
        raise ConfigError(f"the dense engine keeps the top {sel.topk} locations per level with score > "
                          f"{sel.score_thresh}; post-processing asks pre_nms_topk={pp.pre_nms_topk}, "
                          f"score_thresh={pp.score_thresh}. Re-export with a config holding these values "
                          "(sepsnet-export --config) or lower them")
