"""End-to-end post-processing on hand-built dense outputs (resize undone, empty inputs)."""
import pytest
import torch
import torch.nn.functional as F

from sepsnet.config import SEPSNetConfig
from sepsnet.postprocess.candidates import level_sizes
from sepsnet.postprocess.pipeline import panoptic_inference, stuff_labels_at

T, S, K, M, R = 3, 2, 2, 4, 8


def _dense(n=1, h=64, w=96):
    sizes = level_sizes((h // 8, w // 8), 5)
    num_loc = sum(a * b for a, b in sizes)
    stuff = torch.zeros(n, S + 1, h // 4, w // 4)
    stuff[:, 0] = 1.0  # stuff class 0 everywhere ...
    stuff[:, 1, :, 12:] = 2.0  # ... class 1 right of input x=48
    return {
        "boxes": torch.zeros(n, num_loc, 4), "scores": torch.zeros(n, num_loc, T),
        "centerness": torch.ones(n, num_loc), "attention": torch.zeros(n, num_loc, K * M * M),
        "bases": torch.zeros(n, K, h // 4, w // 4), "p3": torch.zeros(n, 8, h // 8, w // 8),
        "stuff_logits": stuff,
    }


def _ones_instances(with_scores=True):
    calls = []

    def run(bases, p3, rois, attention):
        calls.append(rois.clone())
        n = rois.shape[0]
        out = {"mask_probs": torch.ones(n, R, R)}
        if with_scores:
            out["iou_score"] = torch.full((n,), 0.5)
            out["silhouette_score"] = torch.arange(n, dtype=torch.float32)
        return out

    return run, calls


def test_resize_undone_scores_and_dedup():
    dense = _dense()
    dense["boxes"][0, 0] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    dense["boxes"][0, 1] = torch.tensor([8.0, 9.0, 24.0, 24.0])  # NMS IoU 0.94 but other class
    dense["boxes"][0, 2] = torch.tensor([60.0, 40.0, 90.0, 70.0])  # clipped to resized 48x80
    dense["scores"][0, 0, 0], dense["scores"][0, 1, 1], dense["scores"][0, 2, 2] = 0.81, 0.64, 0.49
    run, calls = _ones_instances()
    cfg = SEPSNetConfig()
    cfg.postprocess.stuff_area_limit = 1
    cfg.postprocess.dedup_iou = 0.5
    (res,) = panoptic_inference(dense, run, [((48, 80), (96, 160))], cfg)
    assert len(calls) == 1 and calls[0][:, 0].tolist() == [0, 0, 0]
    assert torch.allclose(calls[0][2, 1:], torch.tensor([60.0, 40.0, 80.0, 48.0]))  # clipped
    # dedup: different classes are never duplicates -> all 3 kept; scores = Eq. 4
    assert res.num_instances == 3
    assert torch.allclose(res.instance_scores, 0.8 * torch.tensor([0.9, 0.8, 0.7]) + 0.2 * 0.5)
    assert torch.allclose(res.instance_boxes[0], torch.tensor([16.0, 16.0, 48.0, 48.0]))
    assert res.id_map.shape == (96, 160) and res.instance_masks.shape == (3, 96, 160)
    segs = {s["id"]: s for s in res.segments_info}
    first = segs[int(res.id_map[20, 20])]
    assert first["isthing"] and first["category_id"] == 0 and first["bbox"] == [16, 16, 32, 32]
    third = segs[int(res.id_map[90, 150])]  # clipped box 60..80 x 40..48 -> 120..160 x 80..96
    assert third["isthing"] and third["category_id"] == 2 and third["bbox"] == [120, 80, 40, 16]
    # stuff: input x=48 -> original x=96; class 1 right of it, class 0 left
    assert not segs[int(res.id_map[90, 10])]["isthing"] and segs[int(res.id_map[90, 10])]["category_id"] == 0
    assert segs[int(res.id_map[70, 150])]["category_id"] == 1 and segs[int(res.id_map[70, 97])]["category_id"] == 1
    assert segs[int(res.id_map[70, 94])]["category_id"] == 0
    assert res.timings == {}  # timing is opt-in


def test_same_class_duplicate_removed_by_silhouette():
    dense = _dense()
    dense["boxes"][0, 0] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    dense["boxes"][0, 1] = torch.tensor([8.0, 8.0, 24.0, 26.0])
    dense["scores"][0, 0, 0], dense["scores"][0, 1, 0] = 0.81, 0.64
    run, _ = _ones_instances()
    cfg = SEPSNetConfig()
    cfg.postprocess.nms_thresh = 0.95  # let both through NMS
    (res,) = panoptic_inference(dense, run, [((64, 96), (64, 96))], cfg)
    # silhouette scores are 0 (first, higher FCOS) and 1 (second): the second survives
    assert res.num_instances == 1 and res.instance_boxes[0, 3] == 26.0
    run_off, _ = _ones_instances(with_scores=False)
    (res,) = panoptic_inference(dense, run_off, [((64, 96), (64, 96))], cfg)
    assert res.num_instances == 2 and torch.allclose(res.instance_scores, torch.tensor([0.9, 0.8]))


def test_low_score_twin_cannot_remove_a_confident_mask():
    # the better silhouette belongs to a twin whose mask score is below instance_score_thresh:
    # it must not remove the confident mask (the fusion would then drop it and lose the object)
    dense = _dense()
    dense["boxes"][0, 0] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    dense["boxes"][0, 1] = torch.tensor([8.0, 8.0, 24.0, 26.0])
    dense["scores"][0, 0, 0], dense["scores"][0, 1, 0] = 0.81, 0.09  # FCOS 0.9 and 0.3
    run, _ = _ones_instances()  # silhouette 0 (confident) and 1 (weak twin), IoU 0.5 each
    cfg = SEPSNetConfig()
    cfg.postprocess.nms_thresh = 0.95
    (res,) = panoptic_inference(dense, run, [((64, 96), (64, 96))], cfg)
    assert res.num_instances == 2  # nothing removed: the twin (score 0.34) is not eligible
    things = [s for s in res.segments_info if s["isthing"]]
    assert len(things) == 1 and abs(things[0]["score"] - (0.8 * 0.9 + 0.2 * 0.5)) < 1e-6


def test_no_detections_all_stuff_batch_of_two():
    dense = _dense(n=2)
    run, calls = _ones_instances()
    res = panoptic_inference(dense, run, [((64, 96), (64, 96)), ((40, 60), (80, 120))], SEPSNetConfig(),
                             return_masks=False)
    assert calls == [] and len(res) == 2
    assert all(s["isthing"] is False for r in res for s in r.segments_info)
    assert res[1].id_map.shape == (80, 120)
    # class 0 fills x < 96 (7680 px); class 1 (x >= 96, 1920 px < stuff_area_limit 4096) stays void
    assert (res[1].id_map[:, :96] == 1).all() and (res[1].id_map[:, 96:] == 0).all()
    assert res[1].segments_info == [{"id": 1, "category_id": 0, "isthing": False, "score": 1.0,
                                     "area": 7680, "bbox": [0, 0, 96, 80]}]
    assert res[1].instance_masks is None and res[1].num_instances == 0


def test_stuff_resize_matches_detectron2_style_crop_and_interpolate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 16, 24, generator=g)
    # valid region 48x80 input pixels = 12x20 logit cells; original 100x130
    ours = stuff_labels_at(logits, (48, 80), (100, 130))
    ref = F.interpolate(logits[None, :, :12, :20], size=(100, 130), mode="bilinear", align_corners=False)[0]
    margin = ref.topk(2, 0).values
    sure = (margin[0] - margin[1]) > 1e-4
    assert torch.equal(ours[sure], ref.argmax(0)[sure])


def test_stuff_resize_fast_path_equals_banded_grid_path(monkeypatch):
    import sepsnet.postprocess.stuff as pl

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 16, 24, generator=g)
    cases = [((50, 90), (77, 131)), ((64, 96), (64, 96)), ((33, 61), (200, 150))]
    fast = [stuff_labels_at(logits, *c) for c in cases]
    monkeypatch.setattr(pl, "_INTERP_BYTES", 0)
    monkeypatch.setattr(pl, "_BAND_BYTES", 4 * 7 * 200)  # a few rows per band
    for c, f in zip(cases, fast):
        slow = stuff_labels_at(logits, *c)
        assert slow.shape == f.shape == c[1]
        assert (slow != f).float().mean() < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu():
    dense = _dense()
    dense["boxes"][0, 0] = torch.tensor([8.0, 8.0, 24.0, 24.0])
    dense["scores"][0, 0, 0] = 0.81
    run, _ = _ones_instances()
    cpu = panoptic_inference(dense, run, [((48, 80), (96, 160))], SEPSNetConfig())[0]
    gpu = panoptic_inference({k: v.cuda() for k, v in dense.items()}, run, [((48, 80), (96, 160))],
                             SEPSNetConfig())[0]
    assert gpu.id_map.is_cuda and torch.equal(gpu.id_map.cpu(), cpu.id_map)
    assert gpu.segments_info == cpu.segments_info


def test_image_size_forms_and_errors():
    from sepsnet.errors import ConfigError

    dense = _dense()
    run, _ = _ones_instances()
    a = panoptic_inference(dense, run, [{"resized": (48, 80), "original": (96, 160)}], SEPSNetConfig())[0]
    b = panoptic_inference(dense, run, [((48, 80), (96, 160))], SEPSNetConfig())[0]
    c = panoptic_inference(dense, run, [(64, 96)], SEPSNetConfig())[0]  # no resize
    assert torch.equal(a.id_map, b.id_map) and c.id_map.shape == (64, 96)
    with pytest.raises(ConfigError, match="image sizes"):
        panoptic_inference(dense, run, [(64, 96), (64, 96)], SEPSNetConfig())
    with pytest.raises(ConfigError, match="lack 'p3'"):
        panoptic_inference({k: v for k, v in dense.items() if k != "p3"}, run, [(64, 96)], SEPSNetConfig())
