"""Candidate selection: thresholds, per-level top-k, FCOS score, class-aware NMS."""
import math

import pytest
import torch

from sepsnet.config import PostprocessConfig
from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import level_sizes, select_candidates


def _dense(num_loc, num_cls=3, k=8):
    boxes = torch.zeros(1, num_loc, 4)
    boxes[0, :] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    attention = torch.arange(num_loc * k, dtype=torch.float32).reshape(1, num_loc, k)
    return boxes, torch.zeros(1, num_loc, num_cls), torch.ones(1, num_loc), attention


def test_level_sizes_ceil():
    assert level_sizes((13, 25), 5) == [(13, 25), (7, 13), (4, 7), (2, 4), (1, 2)]


def test_nms_keeps_and_drops():
    sizes = [(2, 2), (1, 1)]
    boxes, scores, ctr, att = _dense(5)
    boxes[0, 0] = torch.tensor([0, 0, 10, 10.0])
    boxes[0, 1] = torch.tensor([1, 0, 11, 10.0])  # IoU 0.82 with 0 -> dropped (same class)
    boxes[0, 2] = torch.tensor([1, 0, 11, 10.0])  # same box, other class -> kept
    boxes[0, 3] = torch.tensor([30, 30, 40, 40.0])  # far away -> kept
    boxes[0, 4] = torch.tensor([0, 0, 10, 10.0])  # below score threshold -> gone
    scores[0, 0, 0], scores[0, 1, 0], scores[0, 2, 1], scores[0, 3, 0], scores[0, 4, 2] = 0.9, 0.8, 0.7, 0.6, 0.04
    ctr[0, 3] = 0.25
    (c,) = select_candidates(boxes, scores, ctr, att, sizes, PostprocessConfig())
    assert c.classes.tolist() == [0, 1, 0]
    assert torch.allclose(c.scores, torch.tensor([math.sqrt(0.9), math.sqrt(0.7), math.sqrt(0.6 * 0.25)]))
    assert torch.equal(c.attention, att[0, [0, 2, 3]])
    assert c.batch_index.tolist() == [0, 0, 0]


def test_topk_per_level_max_instances_and_clip():
    sizes = [(3, 3), (1, 1)]
    boxes, scores, ctr, att = _dense(10, num_cls=1)
    for i in range(10):  # disjoint boxes, no NMS interaction
        boxes[0, i] = torch.tensor([20.0 * i, 0, 20.0 * i + 10, 10])
    scores[0, :, 0] = torch.linspace(0.1, 0.9, 10)
    cfg = PostprocessConfig(pre_nms_topk=2, max_instances=100)
    (c,) = select_candidates(boxes, scores, ctr, att, sizes, cfg)
    # level 0 (locations 0..8) keeps its 2 best (8, 7), level 1 keeps location 9
    assert sorted(c.attention[:, 0].div(8).long().tolist()) == [7, 8, 9]
    cfg = PostprocessConfig(max_instances=4)
    (c,) = select_candidates(boxes, scores, ctr, att, sizes, cfg, image_sizes=[(8, 125)])
    assert len(c) == 4
    assert c.boxes[:, 3].max() <= 8 and c.boxes[:, 2].max() <= 125
    # box 9 at x 180..190 is outside a 125-wide image: dropped by clipping
    assert 9 not in c.attention[:, 0].div(8).long().tolist()


def test_zero_candidates_and_shape_errors():
    boxes, scores, ctr, att = _dense(5)
    out = select_candidates(boxes, scores, ctr, att, [(2, 2), (1, 1)], PostprocessConfig())
    assert len(out) == 1 and len(out[0]) == 0 and out[0].attention.shape == (0, 8)
    with pytest.raises(ConfigError, match="locations"):
        select_candidates(boxes, scores, ctr, att, [(2, 2)], PostprocessConfig())


@pytest.mark.parametrize("seed", range(4))
def test_prefix_nms_equals_full_batched_nms(seed):
    """class_nms_top (NMS on a growing top-score prefix) == batched_nms(...)[:k] on the CPU path
    with thousands of candidates: distinct scores (no tie order involved), several classes, k
    from a handful (first prefix enough) to more than survive (prefix grows to all)."""
    from torchvision.ops import batched_nms

    from sepsnet.postprocess.candidates import class_nms_top

    g = torch.Generator().manual_seed(seed)
    n = 3000 + 1000 * seed
    xy = torch.rand(n, 2, generator=g) * 800
    wh = torch.rand(n, 2, generator=g) * (40 + 120 * seed) + 1
    boxes = torch.cat([xy, xy + wh], 1)
    scores = (torch.randperm(n, generator=g) + 1).float() / n
    classes = torch.randint(0, 1 + 3 * seed, (n,), generator=g)
    for k in (5, 100, 400, n):
        for iou in (0.3, 0.6):
            want = batched_nms(boxes, scores, classes, iou)[:k]
            assert torch.equal(class_nms_top(boxes, scores, classes, iou, k), want)


def _select_as_before(boxes, scores, centerness, attention, counts, pp, image_hw):
    """The selection of one image as written before the host fast path (issue 13): torch
    ``nonzero`` and ``masked_select`` per level, then the same NMS (:func:`class_nms_top`)."""
    from sepsnet.postprocess.candidates import class_nms_top

    locs, clss, vals, start = [], [], [], 0
    for c in counts:
        prob = scores[0, start:start + c]
        above = prob > pp.score_thresh
        flat = above.reshape(-1).nonzero()[:, 0]
        loc = torch.div(flat, prob.shape[1], rounding_mode="floor")
        val = prob.masked_select(above) * centerness[0, start + loc]
        if val.numel() > pp.pre_nms_topk:
            val, top = val.topk(pp.pre_nms_topk, sorted=False)
            flat, loc = flat[top], loc[top]
        locs.append(loc + start)
        clss.append(flat - loc * prob.shape[1])
        vals.append(val)
        start += c
    loc, cls, fcos = torch.cat(locs), torch.cat(clss), torch.cat(vals).clamp(min=0).sqrt()
    bx = boxes[0, loc].clone()
    bx[:, 0::2] = bx[:, 0::2].clamp(0, float(image_hw[1]))
    bx[:, 1::2] = bx[:, 1::2].clamp(0, float(image_hw[0]))
    valid = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])
    bx, cls, fcos, loc = bx[valid], cls[valid], fcos[valid], loc[valid]
    keep = class_nms_top(bx, fcos, cls, pp.nms_thresh, pp.max_instances)
    return bx[keep], fcos[keep], cls[keep], attention[0, loc[keep]]


@pytest.mark.parametrize("seed", range(3))
def test_host_selection_equals_torch_selection(seed):
    """On CPU the per-level indices come from NumPy and the values from indexing instead of
    ``masked_select``: the same candidates, scores, classes and attention rows, in the same order,
    as the torch form, with thousands of locations above the threshold, per-level top-k cuts, scores
    stored as a non-contiguous view, and ties (scores on a coarse grid)."""
    g = torch.Generator().manual_seed(seed)
    counts, num_cls = [2400, 600, 150], 4
    n = sum(counts)
    xy = torch.rand(n, 2, generator=g) * 300 - 20
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 90 + 1], 1)[None]
    scores = torch.rand(n, num_cls, generator=g) * 0.2
    if seed == 1:
        scores = (scores * 40).round() / 40  # many equal scores
    if seed == 2:
        scores = scores.t().contiguous().t()  # (n, T) view of a (T, n) tensor
    scores = scores[None]
    centerness = 0.5 + 0.5 * torch.rand(1, n, generator=g)
    attention = torch.randn(1, n, 6, generator=g)
    pp = PostprocessConfig()
    pp.score_thresh, pp.pre_nms_topk, pp.max_instances, pp.nms_thresh = 0.05, 900, 60, 0.6
    (got,) = select_candidates(boxes, scores, centerness, attention, counts, pp, [(240, 260)])
    want = _select_as_before(boxes, scores, centerness, attention, counts, pp, (240, 260))
    assert len(got) == pp.max_instances
    assert torch.equal(got.boxes, want[0]) and torch.equal(got.scores, want[1])
    assert torch.equal(got.classes, want[2]) and torch.equal(got.attention, want[3])
