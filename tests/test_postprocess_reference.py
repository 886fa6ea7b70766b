"""The fast post-processing (crops per box, fusion on crops, banded stuff pass) gives exactly the
output of the pre-issue-13 implementation kept in ``tests/_reference_postprocess.py``: identical id
maps, segments and instances, on randomized cases and on the real sample photos."""
import _reference_postprocess as ref
import pytest
import torch
import torch.nn.functional as F

from sepsnet.config import SEPSNetConfig
from sepsnet.model.fcos_head import compute_locations
from sepsnet.postprocess import fusion, stuff
from sepsnet.postprocess.candidates import level_sizes
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.preselect import Preselect
from sepsnet.postprocess.timing import PIPELINE_STAGES, StageTimer

from _instance_stand_in import per_roi_instances
from _photo_frame import photo_dense
from _samples import COCO_IMAGES

T, S, K, M, R = 5, 4, 2, 4, 14


def _random_dense(g: torch.Generator, n: int, h: int, w: int, hot: int) -> dict:
    sizes = level_sizes((h // 8, w // 8), 5)
    level_strides = [8 * 2 ** lvl for lvl in range(len(sizes))]
    loc = torch.cat(compute_locations([torch.empty(hw) for hw in sizes], level_strides))
    stride = torch.cat([torch.full((h * w,), float(st)) for (h, w), st in zip(sizes, level_strides)])
    num_loc = loc.shape[0]
    ext = (torch.rand(n, num_loc, 4, generator=g) * 3 + 0.5) * stride[:, None]
    boxes = torch.cat([loc - ext[..., :2], loc + ext[..., 2:]], -1)
    scores = torch.rand(n, num_loc, T, generator=g) * 0.06
    for b in range(n):
        idx = torch.randperm(num_loc, generator=g)[:hot]
        scores[b, idx, torch.randint(0, T, (hot,), generator=g)] = 0.3 + 0.7 * torch.rand(hot, generator=g)
    stuff = F.avg_pool2d(torch.randn(n, S + 1, h // 4, w // 4, generator=g), 5, 1, 2) * 8
    return {"boxes": boxes, "scores": scores, "centerness": 0.5 + 0.5 * torch.rand(n, num_loc, generator=g),
            "attention": torch.randn(n, num_loc, K * M * M, generator=g),
            "bases": torch.zeros(n, K, h // 4, w // 4), "p3": torch.zeros(n, 8, h // 8, w // 8), "stuff_logits": stuff}


def _random_instances(seed: int, with_scores: bool = True):
    def run(bases, p3, rois, attention):
        g = torch.Generator().manual_seed(seed + rois.shape[0])
        n = rois.shape[0]
        logits = F.interpolate(torch.randn(n, 1, 5, 5, generator=g) * 4, size=(R, R), mode="bilinear")[:, 0]
        out = {"mask_probs": torch.sigmoid(logits + 1.0)}
        if with_scores:
            out["iou_score"] = torch.rand(n, generator=g)
            out["silhouette_score"] = torch.rand(n, generator=g)
        return out
    return run


def assert_same(got, want) -> None:
    assert torch.equal(got.id_map, want.id_map)
    assert got.segments_info == want.segments_info
    assert torch.equal(got.instance_boxes, want.instance_boxes)
    assert torch.equal(got.instance_scores, want.instance_scores)
    assert torch.equal(got.instance_classes, want.instance_classes)
    assert (got.instance_masks is None) == (want.instance_masks is None)
    if want.instance_masks is not None:
        assert torch.equal(got.instance_masks, want.instance_masks)


@pytest.mark.parametrize("seed", range(6))
def test_randomized_cases_equal_reference(seed: int) -> None:
    _check_randomized(seed)


@pytest.mark.parametrize("seed", [0, 3, 5])
def test_deferred_read_form_and_row_tiles_equal_reference(seed: int, monkeypatch) -> None:
    """The form used on CUDA (decisions, ids and statistics kept on the device until one final
    read; scatter-add counts) and the stuff resample split into row tiles, run here on CPU."""
    monkeypatch.setattr(fusion, "READ_ON_CPU", False)
    monkeypatch.setattr(stuff, "_intra_op_threads", lambda: 3)
    monkeypatch.setattr(stuff, "NATIVE", None)
    monkeypatch.setattr(stuff, "_MAX_UNDECIDED", -1.0)  # the resample itself, not the decided labels
    _check_randomized(seed)


def test_stuff_row_tiles_equal_single_resample(monkeypatch) -> None:
    """Stuff labels from exact row tiles (several threads) are those of the single resample of
    the reference, for power-of-two and other scales, enlarging and shrinking."""
    monkeypatch.setattr(stuff, "NATIVE", None)
    monkeypatch.setattr(stuff, "_MAX_UNDECIDED", -1.0)  # the resample itself, not the decided labels
    g = torch.Generator().manual_seed(7)
    tiled = 0
    for i in range(24):
        c = int(torch.randint(4, 14, (1,), generator=g))
        hs, ws = (int(v) for v in torch.randint(20, 50, (2,), generator=g))
        logits = F.avg_pool2d(torch.randn(1, c, hs, ws, generator=g), 3, 1, 1)[0] * 8
        if i % 3 == 0:
            logits = logits.round()  # exact ties between classes
        rh, rw = hs * 4 - int(torch.randint(0, 4, (1,), generator=g)), ws * 4 - 2
        if i % 2:
            oh, ow = (int(v) for v in torch.randint(150, 400, (2,), generator=g))
        else:
            oh, ow = rh * (1, 2, 4)[i % 3], rw * (1, 2, 4)[i % 3]  # power-of-two scales: tiles apply
        want = ref.stuff_labels_at(logits, (rh, rw), (oh, ow))
        for parts in (2, 3):
            monkeypatch.setattr(stuff, "_intra_op_threads", lambda p=parts: p)
            tiled += stuff._row_tiles(hs + 1, oh, 4 * oh / rh, parts) is not None
            assert torch.equal(stuff.stuff_label_map(logits, (rh, rw), (oh, ow)).long(), want)
    assert tiled >= 10


def test_stuff_labels_decided_without_resampling_equal_reference(monkeypatch, stuff_path) -> None:
    """Labels decided from agreeing source cells, interpolated where they disagree and left to the
    kernel (on a small window) at near ties are those of the full resample of the reference: region
    maps like a trained stuff head's, the same with exact ties, and noise (where the NumPy form
    gives up), at enlarging, shrinking and power-of-two scales; by the C helper and by NumPy."""
    calls = {"decided": 0, "windows": 0}
    decided, windows = stuff._decided_labels, stuff._kernel_labels_at

    def count_decided(*args):
        out = decided(*args)
        calls["decided"] += out is not None
        return out

    def count_windows(x, points, taps):
        calls["windows"] += len(points)
        return windows(x, points, taps)

    monkeypatch.setattr(stuff, "_decided_labels", count_decided)
    monkeypatch.setattr(stuff, "_kernel_labels_at", count_windows)
    g = torch.Generator().manual_seed(11)
    for i in range(18):
        c = int(torch.randint(2, 14, (1,), generator=g))
        hs, ws = (int(v) for v in torch.randint(24, 70, (2,), generator=g))
        layout = F.interpolate(torch.randn(1, c, 3, 5, generator=g), size=(hs, ws), mode="bilinear")[0].argmax(0)
        logits = F.one_hot(layout, c).permute(2, 0, 1).float() * 4 + torch.randn(c, hs, ws, generator=g) * 0.5
        if i % 3 == 1:
            logits = logits.round()  # exact ties between classes
        elif i % 3 == 2 and i % 2:
            logits = torch.randn(c, hs, ws, generator=g)  # no regions: the resample runs
        rh, rw = hs * 4 - int(torch.randint(0, 4, (1,), generator=g)), ws * 4 - 1
        oh, ow = ((int(v) for v in torch.randint(80, 500, (2,), generator=g)) if i % 2
                  else (rh * (1, 2, 4)[i % 3], rw * (1, 2, 4)[i % 3]))
        want = ref.stuff_labels_at(logits, (rh, rw), (oh, ow))
        assert torch.equal(stuff.stuff_label_map(logits, (rh, rw), (oh, ow)).long(), want)
    if stuff_path is not None:  # the C helper decided these (the NumPy form is not called then)
        calls["decided"] = stuff_path.decided
    assert calls["decided"] >= 10 and calls["windows"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_host_reads_do_not_grow_with_instances() -> None:
    """On CUDA the host path (``device_path=False``) reads the device a fixed number of times per image (candidate
    selection, one metadata read, one dedup read, one fusion read), whatever the instance count."""
    import warnings

    cfg = SEPSNetConfig()
    counts = []
    for hot in (8, 40):
        dense = {k: v.cuda() for k, v in _random_dense(torch.Generator().manual_seed(1), 1, 96, 160, hot).items()}
        run = _random_instances(2)

        def cuda_run(*a, run=run):
            return {k: v.cuda() for k, v in run(*(t.cpu() for t in a)).items()}
        panoptic_inference(dense, cuda_run, [(96, 160)], cfg, device_path=False)  # warm-up
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                (res,) = panoptic_inference(dense, cuda_run, [(96, 160)], cfg, device_path=False)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert res.num_instances > 0
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    # the dedup read happens only when some same-class boxes overlap, hence the one of slack
    assert abs(counts[1] - counts[0]) <= 1, counts


def random_cfg(seed: int) -> SEPSNetConfig:
    """Post-processing settings varied with ``seed`` (instance count, areas, thresholds)."""
    cfg = SEPSNetConfig()
    pp = cfg.postprocess
    pp.max_instances = [30, 60][seed % 2]
    pp.stuff_area_limit = [1, 64, 400][seed % 3]
    pp.instance_score_thresh = [0.0, 0.3, 0.45][seed % 3]
    pp.overlap_thresh = [0.5, 0.2][seed % 2]
    pp.dedup_iou = [0.3, 0.6][seed % 2]
    pp.nms_thresh = 0.8
    return cfg


def _check_randomized(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cfg = random_cfg(seed)
    h, w = 96, 160
    dense = _random_dense(g, 2, h, w, hot=40)
    sizes = [((96, 152), (130, 205)), ((80, 160), (61, 122))]  # enlarged / shrunk, partial padding
    run = _random_instances(seed, with_scores=seed != 5)
    got = panoptic_inference(dense, run, sizes, cfg)
    want = ref.panoptic_inference(dense, run, sizes, cfg)
    assert sum(r.num_instances for r in want) > 10
    assert any(s["isthing"] for r in want for s in r.segments_info)
    for a, b in zip(got, want):
        assert_same(a, b)


def test_preselect_typed_or_mapping_and_timing() -> None:
    g = torch.Generator().manual_seed(11)
    cfg = SEPSNetConfig()
    dense = _random_dense(g, 1, 64, 96, hot=20)
    run = _random_instances(3)
    timer = StageTimer(enabled=True)
    (a,) = panoptic_inference(dense, run, [(64, 96)], cfg, timer=timer)
    assert set(a.timings) == {*PIPELINE_STAGES, "total"}
    (b,) = panoptic_inference(dense, run, [(64, 96)], cfg, preselect=None)
    assert_same(a, b)
    assert b.timings == {}
    assert Preselect.coerce({"topk": 5, "score_thresh": 0.1}) == Preselect(5, 0.1, False)


@pytest.mark.parametrize("photo", COCO_IMAGES, ids=[p.name for p in COCO_IMAGES])
def test_real_photos_equal_reference(photo) -> None:
    """A tiny model on the shipped COCO photos, resized as evaluation does; eager PyTorch."""
    model, cfg, dense, sizes = photo_dense(photo, ["postprocess.max_instances=40"])
    h, w = sizes[0][1]
    with torch.inference_mode():
        got = panoptic_inference(dense, model.forward_instances, sizes, cfg)[0]
        want = ref.panoptic_inference(dense, model.forward_instances, sizes, cfg)[0]
    assert want.num_instances > 0 and got.id_map.shape == (h, w)
    assert_same(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_panoptic_only_runs_fewer_instances_and_keeps_the_panoptic_output(seed: int) -> None:
    """``panoptic_only``: the instance engine sees only candidates whose best possible Eq. 4 score
    reaches the threshold; id maps and segments are those of the full run, and every instance of the
    full run that is eligible is among those kept."""
    g = torch.Generator().manual_seed(100 + seed)
    cfg = SEPSNetConfig()
    pp = cfg.postprocess
    pp.instance_score_thresh = [0.5, 0.6, 0.75, 0.5][seed]
    pp.max_instances = 60
    dense = _random_dense(g, 2, 96, 160, hot=40)
    sizes = [((96, 152), (130, 205)), ((80, 160), (61, 122))]
    seen: list[int] = []
    inner = per_roi_instances(R, with_scores=seed != 3)

    def run(bases, p3, rois, attention):
        seen.append(rois.shape[0])
        return inner(bases, p3, rois, attention)

    full = panoptic_inference(dense, run, sizes, cfg)
    fast = panoptic_inference(dense, run, sizes, cfg, panoptic_only=True)
    assert seen[1] < seen[0]
    for a, b in zip(fast, full):
        assert torch.equal(a.id_map, b.id_map) and a.segments_info == b.segments_info
        thresh = pp.instance_score_thresh
        kept_a, kept_b = a.instance_scores >= thresh, b.instance_scores >= thresh
        assert torch.equal(a.instance_scores[kept_a], b.instance_scores[kept_b])
    assert any(s["isthing"] for r in full for s in r.segments_info)


@pytest.mark.parametrize("read_on_cpu,byte_visits,workers,byte_segments,run_fraction",
                         [(True, 255, 1, 255, 1 / 16), (True, 3, 1, 255, 1 / 16), (False, 255, 1, 255, 1 / 16),
                          (True, 255, 3, 255, 1 / 16), (True, 255, 2, 9, 1 / 16), (True, 255, 2, 255, 0.0),
                          (True, 255, 1, 255, 1.0)])
def test_fusion_label_dtypes_many_classes_and_bands_equal_reference(read_on_cpu: bool, byte_visits: int,
                                                                    workers: int, byte_segments: int,
                                                                    run_fraction: float, monkeypatch) -> None:
    """Fusion alone against the reference: uint8, int8 and int64 stuff labels (negative and >= S
    values ignored), 0 to 300 stuff classes (one and several 8-, 16- and 32-class bit words on CPU,
    the generic form past 254 or when things and stuff classes overflow the byte codes), row bands
    of a few rows, byte and int32 occupancy of the CPU things pass, the stuff pass's strips shared
    among host threads and counted per run of equal codes, by byte kernels, or both."""
    from sepsnet.postprocess.threads import intra_op_threads

    monkeypatch.setattr(fusion, "READ_ON_CPU", read_on_cpu)
    monkeypatch.setattr(fusion, "BYTE_OCCUPANCY_VISITS", byte_visits)
    monkeypatch.setattr(fusion, "BYTE_CODE_SEGMENTS", byte_segments)
    monkeypatch.setattr(fusion, "BAND_PIXELS", 7 * 53)
    monkeypatch.setattr(fusion, "HOST_SPLIT_PIXELS", 1)
    monkeypatch.setattr(fusion, "MAX_RUN_FRACTION", run_fraction)
    cfg = SEPSNetConfig().postprocess
    cfg.stuff_area_limit, cfg.overlap_thresh, cfg.instance_score_thresh = 20, 0.5, 0.3
    g = torch.Generator().manual_seed(11)
    h, w = 61, 53
    for num_stuff in (0, 3, 11, 31, 40, 70, 300):
        n = int(torch.randint(0, 12, (1,), generator=g))
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        for i in range(n):
            y0, x0 = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
            masks[i, y0:y0 + 25, x0:x0 + 20] = torch.rand(min(25, h - y0), min(20, w - x0), generator=g) > 0.3
        scores, classes = torch.rand(n, generator=g), torch.randint(0, T, (n,), generator=g)
        coarse = torch.randint(-2, num_stuff + 3, (1, 1, 8, 7), generator=g).float()
        coarse[0, 0, 2, 1], coarse[0, 0, 5, 4] = -250, 262  # would wrap to 6 as bytes
        labels = F.interpolate(coarse, size=(h, w), mode="nearest")[0, 0].long()
        forms = [labels] + ([labels.clamp(0, 255).to(torch.uint8)] if num_stuff < 250 else [])
        forms += [labels.clamp(-128, 127).to(torch.int8)] if num_stuff < 120 else []
        for lab in forms:
            want = ref.panoptic_fusion(masks, scores, classes, lab, cfg, num_stuff)
            with intra_op_threads(workers):
                got = fusion.panoptic_fusion(masks, scores, classes, lab, cfg, num_stuff)
            assert torch.equal(got[0], want[0]) and got[1] == want[1], (num_stuff, lab.dtype)


@pytest.mark.parametrize("workers,on_host", [(1, True), (2, True), (3, True), (1, False)])
def test_host_paste_shared_among_threads_equals_reference(workers: int, on_host: bool, monkeypatch) -> None:
    """The CPU paste (scratch reused, NumPy threshold into one buffer, boxes shared among host
    threads by area, each making its boxes' weights) and the per-box torch form of other devices
    give the reference's masks and the areas counted from them, for boxes inside, across and
    outside the image, thin and large ones, and thresholds that are not float32 values."""
    from sepsnet.postprocess import paste
    from sepsnet.postprocess.threads import intra_op_threads

    monkeypatch.setattr(paste, "HOST_SPLIT_PIXELS", 1)
    monkeypatch.setattr(paste, "PASTE_ON_HOST", on_host)
    g = torch.Generator().manual_seed(20 + workers)
    h, w, n = 90, 130, 23
    probs = torch.sigmoid(F.interpolate(torch.randn(n, 1, 5, 5, generator=g) * 4, size=(R, R), mode="bilinear")[:, 0])
    probs[3] = 0.5  # a constant mask at the threshold: the rounding of the weights decides
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 40.0, h + 40.0]) - 20.0
    wh = torch.rand(n, 2, generator=g) * torch.tensor([90.0, 70.0]) + 0.3
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[5] = torch.tensor([-30.0, -20.0, -5.0, -1.0])  # fully outside: an empty crop
    for thr in (0.5, 0.3 + 1e-9):
        want = ref.paste_masks(probs, boxes, (h, w), thr)
        with intra_op_threads(workers):
            got = paste.paste_mask_crops(probs, boxes, (h, w), thr)
        assert torch.equal(got.dense(), want)
        assert got.areas == want.flatten(1).sum(1).tolist()


@pytest.mark.parametrize("seed", range(3))
def test_dedup_pairs_bounded_by_areas_equal_reference(seed: int) -> None:
    """Silhouette dedup on CPU (pairs ruled out by the area bound, the rest counted on the crops'
    overlap) and the device form run on CPU tensors keep exactly the reference's instances: many
    overlapping same-class masks, nested masks whose IoU equals the threshold (not above it: kept)
    or passes it by one pixel, ineligible instances."""
    from sepsnet.postprocess import scoring
    from sepsnet.postprocess.paste import PastedMasks

    g = torch.Generator().manual_seed(seed)
    h, w, n = 60, 80, 40
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n - 4):
        x0, y0 = int(torch.randint(0, w - 20, (1,), generator=g)), int(torch.randint(0, h - 16, (1,), generator=g))
        bw, bh = (int(v) for v in torch.randint(8, 24, (2,), generator=g))
        masks[i, y0:y0 + bh, x0:x0 + bw] = torch.rand(min(bh, h - y0), min(bw, w - x0), generator=g) > 0.15
    masks[n - 4, 10:20, 10:20] = True  # 100 pixels
    masks[n - 3, 10:15, 10:20] = True  # nested, 50 pixels: IoU 0.5 exactly
    masks[n - 2, 30:40, 30:40] = True
    masks[n - 1, 30:40, 30:35] = True
    masks[n - 1, 30, 35] = True  # 51 pixels: IoU 0.51
    classes = torch.randint(0, 2, (n,), generator=g)
    classes[n - 4:] = 2
    sil = torch.rand(n, generator=g)
    eligible = torch.rand(n, generator=g) > 0.1
    eligible[n - 4:] = True
    pasted = PastedMasks.from_dense(masks)
    host_args = (classes.tolist(), [bool(v) for v in eligible])
    removed = []
    for thr in (0.5, 0.3, 0.7):
        want = ref.silhouette_dedup(masks, classes, sil, thr, eligible=eligible)
        assert torch.equal(scoring.silhouette_dedup(masks, classes, sil, thr, eligible=eligible), want)
        host = scoring._duplicates_host(pasted, host_args[0], thr, host_args[1])
        device = scoring._duplicates_device(pasted, host_args[0], thr, host_args[1])
        assert [sorted(d) for d in host] == [sorted(d) for d in device]
        if thr == 0.5:
            assert (n - 3) not in host[n - 4] and (n - 1) in host[n - 2]
        removed.append(n - len(want))
    assert removed[1] > removed[0] > 0
