"""Panoptic fusion: overlap rule, score threshold, stuff area limit, empty inputs."""
import pytest
import torch

from sepsnet.config import PostprocessConfig, SEPSNetConfig
from sepsnet.errors import ConfigError
from sepsnet.postprocess.fusion import panoptic_fusion

CFG = PostprocessConfig(overlap_thresh=0.5, stuff_area_limit=10, instance_score_thresh=0.5)


def _seg(segs, sid):
    return next(s for s in segs if s["id"] == sid)


def test_overlapping_masks_and_tiny_stuff():
    h, w = 20, 30
    masks = torch.zeros(4, h, w, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True   # score 0.9 -> id 1
    masks[1, 5:15, 5:15] = True   # 0.8: 25/100 taken -> kept, gets 75 px
    masks[2, 0:10, 0:12] = True   # 0.7: 100/120 taken (> 0.5) -> skipped
    masks[3, 15:20, 25:30] = True  # 0.4 below the instance threshold -> dropped
    scores = torch.tensor([0.9, 0.8, 0.7, 0.4])
    classes = torch.tensor([3, 1, 3, 0])
    stuff = torch.full((h, w), 2)  # S = 2 -> label 2 = "thing", ignored
    stuff[:, 20:] = 0              # 200 px stuff 0
    stuff[18:, 0:3] = 1            # 6 px stuff 1 < 10 -> void
    id_map, segs = panoptic_fusion(masks, scores, classes, stuff, CFG, num_stuff_classes=2)
    assert id_map.dtype == torch.int32 and id_map.shape == (h, w)
    assert [(s["category_id"], s["isthing"]) for s in segs] == [(3, True), (1, True), (0, False)]
    a, b, st = segs
    assert a["area"] == 100 and a["bbox"] == [0, 0, 10, 10] and a["score"] == pytest.approx(0.9)
    assert b["area"] == 75 and b["bbox"] == [5, 5, 10, 10]
    assert (id_map[5:10, 5:10] == 1).all() and (id_map[10:15, 5:15] == 2).all()
    assert st["area"] == 200 and st["bbox"] == [20, 0, 10, 20]
    assert (id_map[18:, 0:3] == 0).all()
    for s in segs:  # areas agree with the map
        assert int((id_map == s["id"]).sum()) == s["area"]
    assert set(id_map.unique().tolist()) == {0, 1, 2, 3}


def test_instances_take_priority_over_stuff_and_regions_agree():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:6, 2:6] = True
    stuff = torch.zeros(8, 8, dtype=torch.long)
    args = (masks, torch.tensor([0.9]), torch.tensor([0]), stuff)
    cfg = PostprocessConfig(stuff_area_limit=1)
    m1, s1 = panoptic_fusion(*args, cfg, num_stuff_classes=1)
    m2, s2 = panoptic_fusion(*args, cfg, num_stuff_classes=1, regions=torch.tensor([[1, 1, 7, 7]]))
    assert torch.equal(m1, m2) and s1 == s2
    assert s1[1]["area"] == 48 and s1[0]["area"] == 16


def test_empty_inputs():
    stuff = torch.zeros(6, 7, dtype=torch.long)
    none = torch.zeros(0, 6, 7, dtype=torch.bool)
    id_map, segs = panoptic_fusion(none, torch.zeros(0), torch.zeros(0, dtype=torch.long), stuff,
                                   PostprocessConfig(stuff_area_limit=1), num_stuff_classes=3)
    assert segs == [{"id": 1, "category_id": 0, "isthing": False, "score": 1.0, "area": 42, "bbox": [0, 0, 7, 6]}]
    assert (id_map == 1).all()
    id_map, segs = panoptic_fusion(none, torch.zeros(0), torch.zeros(0, dtype=torch.long), stuff + 3,
                                   SEPSNetConfig())  # S=53 from the model config; 42 px < 4096
    assert segs == [] and (id_map == 0).all()
    id_map, segs = panoptic_fusion(none, torch.zeros(0), torch.zeros(0, dtype=torch.long), stuff + 3,
                                   CFG, num_stuff_classes=3)
    assert segs == [] and (id_map == 0).all()
    with pytest.raises(ConfigError, match="num_stuff_classes"):
        panoptic_fusion(none, torch.zeros(0), torch.zeros(0, dtype=torch.long), stuff, CFG)
