"""Per-level top-k pre-selection in the dense engine: the candidates after it equal the
candidates from every location (static and padded variants), the export keeps TopK's k
constant, and a post-processing config it cannot serve is refused."""
from __future__ import annotations

import math

import pytest
import torch

from sepsnet.config import PostprocessConfig
from sepsnet.errors import ConfigError
from sepsnet.model.fcos_head import Preselect, compute_locations, dense_predictions
from sepsnet.postprocess.candidates import level_entries, select_candidates
from sepsnet.postprocess.pipeline import check_preselect

from _compare import lexicographic_order

STRIDES = [8, 16, 32, 64, 128]
T = 4


def _head_outputs(n: int, h: int, w: int, seed: int) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Random head outputs for P3..P7 of an h x w input: many classes above threshold per
    location, boxes spread out so NMS keeps a lot of them."""
    g = torch.Generator().manual_seed(seed)
    sizes, fh, fw = [], math.ceil(h / 8), math.ceil(w / 8)
    for _ in STRIDES:
        sizes.append((fh, fw))
        fh, fw = math.ceil(fh / 2), math.ceil(fw / 2)
    outputs = {
        "cls_logits": [torch.randn(n, T, a, b, generator=g) * 2 - 1 for a, b in sizes],
        "bbox_reg": [torch.rand(n, 4, a, b, generator=g) * 40 + 2 for a, b in sizes],
        "centerness": [torch.randn(n, 1, a, b, generator=g) for a, b in sizes],
        "attention": [torch.randn(n, 9, a, b, generator=g) for a, b in sizes],
    }
    feats = [torch.zeros(1, 1, a, b) for a, b in sizes]
    return outputs, compute_locations(feats, STRIDES)


def _same(a, b) -> None:
    """Equal candidate sets (one backend, exact values), compared in a total order: ties in score
    may come in any order from the sort."""
    assert len(a) == len(b) > 0
    order_a = lexicographic_order(a.scores, a.classes, a.boxes)
    order_b = lexicographic_order(b.scores, b.classes, b.boxes)
    assert torch.equal(a.classes[order_a], b.classes[order_b])
    assert torch.allclose(a.scores[order_a], b.scores[order_b])
    assert torch.allclose(a.boxes[order_a], b.boxes[order_b])
    assert torch.equal(a.attention[order_a], b.attention[order_b])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("topk,thresh", [(6, 0.3), (40, 0.2), (1000, 0.05)])
def test_preselected_candidates_equal_full(padded: bool, topk: int, thresh: float) -> None:
    pp = PostprocessConfig(pre_nms_topk=topk, score_thresh=thresh, max_instances=400, nms_thresh=0.8)
    sel = Preselect(topk=topk, score_thresh=thresh, padded=padded)
    manifest_sel = {"topk": topk, "score_thresh": thresh, "padded": padded}
    for seed, (h, w) in enumerate([(96, 160), (200, 120)]):
        outputs, locs = _head_outputs(2, h, w, seed)
        full = dense_predictions(outputs, locs)
        pre = dense_predictions(outputs, locs, sel)
        p3 = outputs["cls_logits"][0].shape[-2:]
        counts = level_entries(p3, manifest_sel)
        assert pre["attention"].shape[1] == sum(counts)
        if topk < 1000:
            assert sum(counts) < full["attention"].shape[1]
        clip = [(h, w), (h, w)]
        got = select_candidates(pre["boxes"], pre["scores"], pre["centerness"], pre["attention"], counts, pp, clip)
        ref = select_candidates(full["boxes"], full["scores"], full["centerness"], full["attention"],
                                level_entries(p3), pp, clip)
        for a, b in zip(got, ref):
            _same(a, b)
        if topk < 1000:  # the per-level top-k really truncated: without it there are more candidates
            unlimited = select_candidates(full["boxes"], full["scores"], full["centerness"], full["attention"],
                                          level_entries(p3), PostprocessConfig(
                                              pre_nms_topk=10 ** 6, score_thresh=thresh, max_instances=400,
                                              nms_thresh=0.8), clip)
            assert all(len(u) > len(r) for u, r in zip(unlimited, ref))


def test_padded_levels_have_exactly_topk_and_padding_never_scores() -> None:
    outputs, locs = _head_outputs(1, 64, 64, 3)  # P3 8x8 = 64 locations ... P7 1x1
    pre = dense_predictions(outputs, locs, Preselect(topk=100, score_thresh=0.05, padded=True))
    assert pre["scores"].shape == (1, 500, T)
    sizes = [8 * 8, 4 * 4, 2 * 2, 1, 1]
    start = 0
    for n in sizes:
        assert (pre["scores"][0, start + n:start + 100] == 0).all()  # the padding
        assert (pre["scores"][0, start:start + n] > 0).all()
        start += 100


def test_check_preselect_refuses_what_the_engine_cannot_serve() -> None:
    sel = {"topk": 100, "score_thresh": 0.05, "padded": False}
    check_preselect(sel, PostprocessConfig(pre_nms_topk=100, score_thresh=0.05))
    check_preselect(sel, PostprocessConfig(pre_nms_topk=50, score_thresh=0.3))
    check_preselect(None, PostprocessConfig(pre_nms_topk=5000))
    with pytest.raises(ConfigError, match="top 100 locations"):
        check_preselect(sel, PostprocessConfig(pre_nms_topk=200))
    with pytest.raises(ConfigError, match="score_thresh=0.01"):
        check_preselect(sel, PostprocessConfig(score_thresh=0.01))


def test_level_entries_and_count_mismatch_is_named() -> None:
    assert level_entries((13, 25)) == [325, 91, 28, 8, 2]
    assert level_entries((13, 25), {"topk": 50, "score_thresh": 0.05}) == [50, 50, 28, 8, 2]
    assert level_entries((13, 25), {"topk": 50, "score_thresh": 0.05, "padded": True}) == [50] * 5
    boxes, scores = torch.zeros(1, 138, 4), torch.zeros(1, 138, T)
    with pytest.raises(ConfigError, match="L=138"):
        select_candidates(boxes, scores, torch.zeros(1, 138), torch.zeros(1, 138, 2), level_entries((13, 25)),
                          PostprocessConfig())
