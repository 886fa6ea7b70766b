"""The device post-processing path (``sepsnet.postprocess.device_path``), run here on CPU tensors:
the same output as the pre-issue-13 reference (``tests/_reference_postprocess.py``) and as the host
selection/torchvision NMS, with at most one host read per frame, counted by ``HostReadCounter``."""
import _reference_postprocess as ref
import pytest
import torch
import torch.nn.functional as F
from test_postprocess_reference import _random_dense, assert_same, random_cfg
from torchvision.ops import batched_nms

from sepsnet.config import SEPSNetConfig
from sepsnet.postprocess import device_path
from sepsnet.postprocess.candidates import level_entries, select_candidates
from sepsnet.postprocess.device_candidates import nms_keep, select_slot_candidates
from sepsnet.postprocess.host_reads import HostReadCounter
from sepsnet.postprocess.pipeline import panoptic_inference
from sepsnet.postprocess.timing import PIPELINE_STAGES, StageTimer

from _instance_stand_in import per_roi_instances
from _photo_frame import photo_dense
from _samples import COCO_IMAGES

R = 14
SIZES = [((96, 152), (130, 205)), ((80, 160), (61, 122))]  # enlarged / shrunk, partial padding


def _cfg(seed: int) -> SEPSNetConfig:
    cfg = random_cfg(seed)
    cfg.postprocess.nms_thresh = [0.8, 0.5][seed % 2]
    cfg.postprocess.pre_nms_topk = [150, 400][seed % 2]
    return cfg


@pytest.mark.parametrize("seed", range(3))
def test_device_path_equals_reference_with_one_read(seed: int, monkeypatch) -> None:
    if seed == 1:  # paste and dedup products in several chunks (instances, pixel columns)
        monkeypatch.setattr(device_path, "PASTE_CHUNK_BYTES", 4 * 130 * 205 * 3 + 5)
    cfg = _cfg(seed)
    dense = _random_dense(torch.Generator().manual_seed(seed), 2, 96, 160, hot=40)
    run = per_roi_instances(R, with_scores=seed != 2)
    with HostReadCounter() as reads:
        got = panoptic_inference(dense, run, SIZES, cfg, device_path=True)
    want = ref.panoptic_inference(dense, run, SIZES, cfg)
    assert reads.reads == 1 and reads.uploads == 0, (reads.events, reads.upload_events)
    assert sum(r.num_instances for r in want) > 10
    assert any(s["isthing"] for r in want for s in r.segments_info)
    for a, b in zip(got, want):
        assert_same(a, b)


def test_host_path_reads_many_times() -> None:
    """The counter sees the host path's reads (so the one-read assertion above can fail)."""
    cfg = _cfg(0)
    dense = _random_dense(torch.Generator().manual_seed(0), 2, 96, 160, hot=40)
    with HostReadCounter() as reads:
        panoptic_inference(dense, per_roi_instances(R), SIZES, cfg, device_path=False)
    assert reads.reads > 10


@pytest.mark.parametrize("seed", range(4))
def test_slot_candidates_equal_host_selection(seed: int) -> None:
    """Fixed top-k + fixed-point NMS = nonzero + top-k + torchvision NMS: with fewer than 1000
    candidates (batched_nms shifts boxes per class) and more (per-class NMS), a binding top-k."""
    g = torch.Generator().manual_seed(seed)
    pp = _cfg(seed).postprocess
    pp.score_thresh = [0.05, 0.01][seed % 2]  # about 300 / 1300 candidates per image
    pp.pre_nms_topk = [150, 1000][seed % 2]  # binding on the first level / not
    pp.max_instances = 100
    dense = _random_dense(g, 2, 96, 160, hot=[40, 300][seed // 2])
    counts = level_entries(dense["p3"].shape[-2:], None)
    args = (dense["boxes"], dense["scores"], dense["centerness"], dense["attention"], counts, pp, [s[0] for s in SIZES])
    want = select_candidates(*args)
    with HostReadCounter() as reads:
        got = select_slot_candidates(*args)
    assert reads.reads == 0 and reads.uploads == 0, reads.events
    assert bool(got.settled.all())
    for b, c in enumerate(want):
        n = len(c)
        assert n > 10 and int(got.valid[b].sum()) == n and bool(got.valid[b, :n].all())
        assert torch.equal(got.boxes[b, :n], c.boxes) and torch.equal(got.scores[b, :n], c.scores)
        assert torch.equal(got.classes[b, :n], c.classes) and torch.equal(got.attention[b, :n], c.attention)


@pytest.mark.parametrize("many", [False, True])
def test_nms_at_the_threshold_equals_torchvision(many: bool) -> None:
    """IoUs exactly at and one rounding around the threshold (integer boxes: IoU 1/2, 1/3, 2/3),
    decided as torchvision's CPU kernel decides them; with <= 1000 boxes (class-shifted boxes)
    and > 1000 (raw boxes)."""
    g = torch.Generator().manual_seed(3)
    n = 1200 if many else 300
    x = torch.randint(0, 40, (n, 1), generator=g).float() * 2
    y = torch.randint(0, 40, (n, 1), generator=g).float() * 2
    w = torch.randint(1, 4, (n, 1), generator=g).float() * 2
    boxes = torch.cat([x, y, x + w, y + w], 1)
    scores = torch.randperm(n, generator=g).float() / n + 0.01  # distinct
    classes = torch.randint(0, 3, (n,), generator=g)
    for thresh in (0.5, 1 / 3, 2 / 3, 0.25):
        want = batched_nms(boxes, scores, classes, thresh)
        order, keep, settled = nms_keep(boxes[None], scores[None], classes[None], torch.ones(1, n, dtype=torch.bool),
                                        thresh, iterations=64)
        assert int(settled[0]) == n
        assert torch.equal(order[0][keep[0]], want), thresh


def test_nms_chain_settles_or_is_reported() -> None:
    """A suppression chain (each box overlaps the next only) longer than the fixed steps is reported
    unsettled beyond its settled prefix; enough steps give torchvision's result."""
    n = 40
    x = torch.arange(n).float() * 3
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)  # IoU(i, i+1) = 7/13
    scores = 1 - torch.arange(n).float() / n
    classes = torch.zeros(n, dtype=torch.long)
    valid = torch.ones(1, n, dtype=torch.bool)
    want = batched_nms(boxes, scores, classes, 0.5)
    _, keep, settled = nms_keep(boxes[None], scores[None], classes[None], valid, 0.5, iterations=4)
    assert int(settled[0]) < n
    assert torch.equal(keep[0, :int(settled[0])], torch.isin(torch.arange(n), want)[:int(settled[0])])
    _, keep, settled = nms_keep(boxes[None], scores[None], classes[None], valid, 0.5, iterations=n + 1)
    assert int(settled[0]) == n and torch.equal(torch.arange(n)[keep[0]], want)


def test_unsettled_frame_goes_to_host_path(monkeypatch) -> None:
    """With one fixed-point step nothing settles: the frame is finished on the host path, exactly."""
    monkeypatch.setattr(device_path, "FUSION_ITERATIONS", 1)
    monkeypatch.setattr(device_path, "DEDUP_ITERATIONS", 1)
    cfg = _cfg(1)
    dense = _random_dense(torch.Generator().manual_seed(1), 2, 96, 160, hot=40)
    run = per_roi_instances(R)
    with HostReadCounter() as reads:
        got = panoptic_inference(dense, run, SIZES, cfg, device_path=True)
    assert reads.reads > 1
    for a, b in zip(got, ref.panoptic_inference(dense, run, SIZES, cfg)):
        assert_same(a, b)


def test_device_path_timing_and_panoptic_only() -> None:
    cfg = _cfg(2)
    cfg.postprocess.instance_score_thresh = 0.6
    dense = _random_dense(torch.Generator().manual_seed(2), 1, 64, 96, hot=20)
    run = per_roi_instances(R)
    timer = StageTimer(enabled=True)
    (a,) = panoptic_inference(dense, run, [(64, 96)], cfg, timer=timer, device_path=True)
    assert set(a.timings) == {*PIPELINE_STAGES, "total"}
    (b,) = panoptic_inference(dense, run, [(64, 96)], cfg, panoptic_only=True, device_path=True)
    (c,) = panoptic_inference(dense, run, [(64, 96)], cfg, panoptic_only=True, device_path=False)
    assert_same(b, c)
    assert torch.equal(a.id_map, b.id_map) and a.segments_info == b.segments_info


@pytest.mark.parametrize("photo", COCO_IMAGES[:1], ids=[p.name for p in COCO_IMAGES[:1]])
def test_real_photo_device_path_equals_reference(photo) -> None:
    """The tiny model on a shipped COCO photo, eager PyTorch: the instance engine runs on the padded
    slot batch here and on the exact batch in the reference."""
    model, cfg, dense, sizes = photo_dense(photo, ["postprocess.max_instances=12", "postprocess.pre_nms_topk=200"])
    h, w = sizes[0][1]
    with torch.inference_mode():
        with HostReadCounter() as reads:
            got = panoptic_inference(dense, model.forward_instances, sizes, cfg, device_path=True)[0]
        want = ref.panoptic_inference(dense, model.forward_instances, sizes, cfg)[0]
    assert want.num_instances > 0 and got.id_map.shape == (h, w)
    assert reads.reads == 1, reads.events
    assert_same(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_path_syncs_once_per_frame() -> None:
    """On CUDA the default path is the device path: ``torch.cuda.set_sync_debug_mode`` reports one
    synchronisation for the frame (the final read), and the output is the CPU device path's."""
    import warnings

    cfg = _cfg(0)
    dense = _random_dense(torch.Generator().manual_seed(0), 2, 96, 160, hot=40)
    run = per_roi_instances(R)
    want = panoptic_inference(dense, run, SIZES, cfg, device_path=True)
    cuda_dense = {k: v.cuda() for k, v in dense.items()}
    panoptic_inference(cuda_dense, run, SIZES, cfg)  # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = panoptic_inference(cuda_dense, run, SIZES, cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, syncs
    for a, b in zip(got, want):
        assert torch.equal(a.id_map.cpu(), b.id_map) and a.segments_info == b.segments_info


def test_padded_instance_batch_changes_nothing_for_valid_rois() -> None:
    """What the real-photo comparison relies on: the eager instance head gives a roi the same
    values in a larger (padded) batch."""
    from pathlib import Path

    from sepsnet.config import load_config
    from sepsnet.model import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny_synthetic.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.inference_mode():
        dense = model.forward_dense(torch.randn(1, 3, 128, 160))
        rois = torch.tensor([[0, 10.0, 12, 60, 70], [0, 30, 5, 90, 100], [0, 0, 0, 0, 0]])
        att = F.normalize(torch.randn(3, dense["attention"].shape[-1]), dim=1)
        small = model.forward_instances(dense["bases"], dense["p3"], rois[:2], att[:2])
        big = model.forward_instances(dense["bases"], dense["p3"], rois, att)
    for k, v in small.items():
        assert torch.equal(big[k][:2], v), k


def test_float32_below_gives_the_float64_comparison() -> None:
    from sepsnet.postprocess.device_candidates import float32_below

    g = torch.Generator().manual_seed(0)
    for t in (0.5, 0.6, 0.7, 1 / 3, 0.8, 0.45, 2 / 3):
        x = torch.tensor(t, dtype=torch.float32)
        near = x + torch.arange(-40, 41, dtype=torch.float32) * 6e-8 + torch.rand(81, generator=g) * 1e-9
        near = torch.cat([near, torch.nextafter(x, torch.tensor(0.0))[None], x[None],
                          torch.nextafter(x, torch.tensor(1.0))[None]])
        assert torch.equal(near > float32_below(t), near.double() > t), t


@pytest.mark.parametrize("padded", [False, True])
def test_preselecting_dense_engine(padded: bool) -> None:
    """Dense outputs of a pre-selecting engine (top-k per level, padded to exactly k as dynamic-shape
    exports do): the device path gives the host path's result."""
    from pathlib import Path

    from sepsnet.config import load_config, parse_overrides
    from sepsnet.model import build_model
    from sepsnet.postprocess.preselect import Preselect

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides([
        "postprocess.score_thresh=0.01", "postprocess.pre_nms_topk=60", "postprocess.instance_score_thresh=0.0",
        "postprocess.max_instances=15", "postprocess.stuff_area_limit=16"]))
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    sel = Preselect(topk=60, score_thresh=0.01, padded=padded)
    with torch.inference_mode():
        dense = model.forward_dense(torch.randn(1, 3, 96, 128) * 2, preselect=sel)
        sizes = [((90, 120), (135, 180))]
        got = panoptic_inference(dense, model.forward_instances, sizes, cfg, preselect=sel, device_path=True)[0]
        want = panoptic_inference(dense, model.forward_instances, sizes, cfg, preselect=sel, device_path=False)[0]
    assert want.num_instances > 0
    assert_same(got, want)
