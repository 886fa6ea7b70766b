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
