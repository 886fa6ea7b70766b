"""Mask pasting: exact box fill, brute-force per-pixel reference, grid_sample agreement."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from sepsnet.postprocess.paste import paste_mask_crops, paste_masks, scale_boxes


def _reference(prob, box, h, w, thr):
    """Per-pixel bilinear sampling, zero outside the mask, pixel centres at +0.5."""
    r = prob.shape[0]
    x0, y0, x1, y1 = box.tolist()
    out = torch.zeros(h, w, dtype=torch.bool)

    def at(i, j):
        return float(prob[i, j]) if 0 <= i < r and 0 <= j < r else 0.0

    for y in range(h):
        v = (y + 0.5 - y0) / (y1 - y0) * r - 0.5
        for x in range(w):
            u = (x + 0.5 - x0) / (x1 - x0) * r - 0.5
            i0, j0 = math.floor(v), math.floor(u)
            fy, fx = v - i0, u - j0
            val = ((1 - fy) * ((1 - fx) * at(i0, j0) + fx * at(i0, j0 + 1))
                   + fy * ((1 - fx) * at(i0 + 1, j0) + fx * at(i0 + 1, j0 + 1)))
            out[y, x] = val >= thr
    return out


def test_ones_mask_fills_integer_box_exactly():
    boxes = torch.tensor([[3.0, 5.0, 40.0, 17.0], [0.0, 0.0, 64.0, 48.0], [60.0, 40.0, 200.0, 90.0],
                          [10, 10, 11, 12.0]])
    m = paste_masks(torch.ones(4, 56, 56), boxes, (48, 64), 0.5)
    for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        ref = torch.zeros(48, 64, dtype=torch.bool)
        ref[y0:y1, x0:x1] = True  # clipped at the border by slicing
        assert torch.equal(m[k], ref), k


def test_random_boxes_match_brute_force_reference():
    g = torch.Generator().manual_seed(1)
    h, w, r = 23, 29, 7
    probs = torch.rand(12, r, r, generator=g)
    xy = torch.rand(12, 2, generator=g) * torch.tensor([w + 10.0, h + 10.0]) - 5.0  # some partly outside
    wh = torch.rand(12, 2, generator=g) * 20 + 0.7
    boxes = torch.cat([xy, xy + wh], 1)
    for thr in (0.5, 0.2):
        m = paste_masks(probs, boxes, (h, w), thr)
        for k in range(12):
            assert torch.equal(m[k], _reference(probs[k], boxes[k], h, w, thr)), (k, thr)
    # crops per box, kept or pasted again on demand (no budget), are the same masks
    planes = paste_masks(probs, boxes, (h, w), 0.5)
    for budget in (1 << 20, 0, 60):
        crops = paste_mask_crops(probs, boxes, (h, w), 0.5, budget_bytes=budget)
        assert torch.equal(crops.dense(), planes) and crops.areas == planes.flatten(1).sum(1).tolist()
    assert any(c is None for c in paste_mask_crops(probs, boxes, (h, w), 0.5, budget_bytes=60).crops)


def test_matches_grid_sample_over_the_box():
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(6, 56, 56, generator=g)
    boxes = torch.tensor([[5.3, 7.1, 90.2, 60.7], [-20.0, -3.5, 30.0, 40.0], [70, 50, 140, 120.0],
                          [0, 0, 100, 80.0], [33.3, 21.1, 34.9, 25.2], [10, 10, 60, 11.0]])
    h, w = 80, 100
    got = paste_masks(probs, boxes, (h, w), 0.5)
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    gx = (xs[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)], -1)
    ref = F.grid_sample(probs[:, None], grid, align_corners=False)[:, 0]
    close = (ref - 0.5).abs() < 1e-5  # ties may flip by rounding
    assert torch.equal(got[~close], (ref >= 0.5)[~close])


def test_empty_and_scale():
    m, reg = paste_masks(torch.zeros(0, 56, 56), torch.zeros(0, 4), (10, 12), return_regions=True)
    assert m.shape == (0, 10, 12) and m.dtype == torch.bool and reg.shape == (0, 4)
    b = scale_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (400, 600), (800, 900))
    assert torch.allclose(b, torch.tensor([[15.0, 40.0, 45.0, 80.0]]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(30, 56, 56, generator=g)
    boxes = torch.rand(30, 4, generator=g) * 200
    boxes[:, 2:] += boxes[:, :2]
    cpu = paste_masks(probs, boxes, (300, 400))
    gpu = paste_masks(probs.cuda(), boxes.cuda(), (300, 400))
    assert gpu.is_cuda and (gpu.cpu() != cpu).float().mean() < 1e-4


def test_paste_restores_the_thread_count_also_when_called_concurrently():
    """Per-box products run with one intra-op thread; the caller's count comes back, also when
    several threads paste at once (one shared save/restore)."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 14, 14, generator=g)
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0]] * 6) + torch.arange(6.0)[:, None]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = paste_masks(probs, boxes, (64, 80))
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda _: paste_masks(probs, boxes, (64, 80)), range(8)))
        assert torch.get_num_threads() == 2
        assert all(torch.equal(m, want) for m in got)
    finally:
        torch.set_num_threads(before)


def test_intra_op_threads_nest_and_restore_under_concurrency():
    """The predictor's ``postprocess_threads`` block and the one-thread sections inside it: a nested
    block gives back the count it found, and the process's count returns after concurrent frames."""
    from concurrent.futures import ThreadPoolExecutor

    from sepsnet.postprocess.threads import intra_op_threads, one_intra_op_thread

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with intra_op_threads(2):
            assert torch.get_num_threads() == 2
            with one_intra_op_thread(torch.device("cpu")):
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3

        def frame(_: int) -> None:
            with intra_op_threads(2), one_intra_op_thread(torch.device("cpu")):
                torch.ones(64).sum()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(frame, range(16)))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_host_workers_run_every_part_keep_thread_counts_and_survive_fork():
    """Host worker threads: every part runs once (the first on the caller), an error in any part
    reaches the caller, torch's thread count is the caller's afterwards (also when a pool thread
    started, and set its own, during the block), and a forked child gets a pool of its own (the
    parent's threads do not exist there)."""
    import multiprocessing
    import threading

    from sepsnet.postprocess import threads
    from sepsnet.postprocess.threads import host_workers, on_host_workers, one_intra_op_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    threads._forget_pool()  # a fresh pool thread: it sets its own count on its first part
    try:
        assert host_workers(torch.device("cpu"), 10, 1) == min(2, os.cpu_count() or 1)
        assert host_workers(torch.device("cpu"), 10, 100) == 1
        assert host_workers(torch.device("meta"), 10, 1) == 1
        seen: list[tuple[int, str]] = []
        with one_intra_op_thread(torch.device("cpu")):
            on_host_workers(lambda k: seen.append((k, threading.current_thread().name)), [0, 1, 2])
            assert torch.get_num_threads() == 1
        assert sorted(k for k, _ in seen) == [0, 1, 2]
        assert dict(seen)[0] == threading.current_thread().name
        assert torch.get_num_threads() == 2

        def fail(k: int) -> None:
            if k == 1:
                raise ValueError("part 1")
        with pytest.raises(ValueError, match="part 1"):
            on_host_workers(fail, [0, 1])
        if "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            child = ctx.Process(target=on_host_workers, args=(len, ["ab", "cd", "ef"]))
            child.start()
            child.join(30)
            if child.is_alive():  # waiting for a thread that does not exist in the child
                child.kill()
            assert child.exitcode == 0
    finally:
        torch.set_num_threads(before)


def test_host_paste_scratch_in_and_out_of_inference_mode():
    """The scratch a host thread keeps between pastes is usable whether it was first made inside
    ``torch.inference_mode`` (evaluation) or outside it, in either order (a fresh thread each time:
    the scratch is per thread), and the masks are the same."""
    import threading

    g = torch.Generator().manual_seed(4)
    probs = torch.rand(5, 14, 14, generator=g)
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0], [10, 5, 70, 44], [0, 0, 80, 60], [33, 21, 35, 26], [5, 9, 60, 12]])
    want = paste_masks(probs, boxes, (60, 80), 0.5)
    for first_inference in (True, False):
        got: list[torch.Tensor] = []

        def run(first_inference: bool = first_inference, got: list = got) -> None:
            for inference in (first_inference, not first_inference):
                with torch.inference_mode(inference):
                    got.append(paste_mask_crops(probs, boxes, (60, 80), 0.5).dense())
        t = threading.Thread(target=run)
        t.start()
        t.join()
        assert len(got) == 2 and all(torch.equal(m, want) for m in got)
