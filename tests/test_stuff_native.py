"""The stuff labels by the optional C helper (``sepsnet.postprocess._stuff_native``) and by the NumPy form
equal the dense resample of the reference (``tests/_reference_postprocess.py``) on many shapes and scales:
non-power-of-two, shrinking and same-size scales, 1, 2 and > 256 classes (int64 labels), exact ties,
constant maps, 1 x 1 maps, strided logits, and NaN / infinite logits (the dense path then)."""
import _reference_postprocess as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sepsnet.postprocess import stuff


def _region_logits(g: torch.Generator, c: int, hs: int, ws: int) -> torch.Tensor:
    """Large regions with a clear lead plus noise, the shape of a trained stuff head's output."""
    layout = F.interpolate(torch.randn(1, c, 3, 4, generator=g), size=(hs, ws), mode="bilinear")[0].argmax(0)
    return F.one_hot(layout, c).permute(2, 0, 1).float() * 3 + torch.randn(c, hs, ws, generator=g) * 0.5


def _case(i: int, g: torch.Generator) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Logits (C, hs, ws) of the padded input, resized and original sizes: case ``i`` of a cycle of kinds."""
    c = (2, 3, 7, 12, 1, 300)[i % 6]
    tiny = i % 11 == 0
    hs, ws = (1, 1) if tiny else tuple(int(v) for v in torch.randint(2, 30, (2,), generator=g))
    extra = int(torch.randint(0, 3, (1,), generator=g))  # padding cells beyond the valid region: a strided crop
    logits = _region_logits(g, c, hs + extra, ws + extra)
    kind = i % 5
    if kind == 1:
        logits = logits.round()  # exact ties between classes
    elif kind == 2:
        logits = torch.randn(c, hs + extra, ws + extra, generator=g)  # noise
    elif kind == 3 and i % 2:
        logits = torch.full_like(logits, 0.5)  # constant: every pixel a tie
    rh, rw = hs * 4 - int(torch.randint(0, 4, (1,), generator=g)), ws * 4 - int(torch.randint(0, 4, (1,), generator=g))
    scale = i % 4
    if scale == 0:  # non-power-of-two enlarging
        oh, ow = (int(v) for v in torch.randint(rh, 3 * rh + 2, (2,), generator=g))
        ow = max(1, ow * rw // max(rh, 1))
    elif scale == 1:  # shrinking
        oh, ow = max(1, rh * 2 // 3), max(1, rw * 3 // 5)
    elif scale == 2:  # same size
        oh, ow = rh, rw
    else:  # power of two
        oh, ow = rh * 2, rw * 4
    if c > 256:
        oh, ow = min(oh, 60), min(ow, 60)
    return logits, (rh, rw), (oh, ow)


def test_paths_equal_dense_resample_randomized(stuff_path) -> None:
    """Both paths give the reference's labels on 44 randomized cases; the C helper decides most of them
    itself (the rest: one class, constant maps, too many near ties)."""
    g = torch.Generator().manual_seed(5)
    for i in range(44):
        logits, resized, original = _case(i, g)
        want = ref.stuff_labels_at(logits, resized, original)
        got = stuff.stuff_label_map(logits, resized, original)
        assert got.dtype == (torch.uint8 if logits.shape[0] <= 256 else torch.int64)
        assert torch.equal(got.long(), want), (i, tuple(logits.shape), resized, original)
    if stuff_path is not None:
        assert stuff_path.decided >= 20


def test_native_equals_numpy_on_larger_maps(stuff_native, monkeypatch) -> None:
    """On maps of a few hundred pixels a side (region maps with and without exact ties), the C helper,
    the NumPy form and the dense resample give the same labels."""
    native = stuff.NATIVE
    g = torch.Generator().manual_seed(9)
    for i in range(6):
        c = (12, 20, 5)[i % 3]
        logits = _region_logits(g, c, 40, 56)
        if i % 2:
            logits = (logits * 2).round() / 2
        resized, original = (160, 222), ((300, 417), (640, 888), (120, 130))[i % 3]
        want = ref.stuff_labels_at(logits, resized, original)
        monkeypatch.setattr(stuff, "NATIVE", native)
        got_native = stuff.stuff_label_map(logits, resized, original)
        monkeypatch.setattr(stuff, "NATIVE", None)
        got_numpy = stuff.stuff_label_map(logits, resized, original)
        assert torch.equal(got_native, got_numpy) and torch.equal(got_native.long(), want), i
    assert stuff_native.decided >= 4


def test_strided_logits_channels_last(stuff_path) -> None:
    """Logits whose classes are the innermost axis in memory (column stride C, not 1) give the same labels."""
    g = torch.Generator().manual_seed(3)
    for c in (3, 12):
        cl = _region_logits(g, c, 20, 26).permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (C, h, w) view
        assert cl.stride()[-1] == c
        want = ref.stuff_labels_at(cl.contiguous(), (80, 101), (203, 250))
        assert torch.equal(stuff.stuff_label_map(cl, (80, 101), (203, 250)).long(), want)
    if stuff_path is not None:
        assert stuff_path.decided == 2


def test_near_ties_go_to_the_kernel_and_cap(stuff_path, monkeypatch) -> None:
    """A patch where two classes are exactly equal: those pixels go to the kernel on small windows (the
    labels stay the reference's); with no room for near ties the dense path runs, same labels."""
    g = torch.Generator().manual_seed(4)
    logits = _region_logits(g, 6, 24, 30)
    logits[2, 5:7, 5:8] = logits[:, 5:7, 5:8].max(0).values  # class 2 ties the top class there
    logits[4, 5:7, 5:8] = logits[2, 5:7, 5:8]
    want = ref.stuff_labels_at(logits, (96, 120), (150, 190))
    seen = []
    windows = stuff._kernel_labels_at

    def count(x, points, taps):
        seen.append(len(points))
        return windows(x, points, taps)

    monkeypatch.setattr(stuff, "_kernel_labels_at", count)
    assert torch.equal(stuff.stuff_label_map(logits, (96, 120), (150, 190)).long(), want)
    assert seen and seen[0] >= 1
    monkeypatch.setattr(stuff, "_MAX_NEAR_TIES", 0)
    assert torch.equal(stuff.stuff_label_map(logits, (96, 120), (150, 190)).long(), want)


@pytest.mark.parametrize("original", [(200, 250), (97, 131), (160, 180), (55, 61)])
def test_kernel_windows_give_the_dense_values_bit_for_bit(original, monkeypatch) -> None:
    """The near-tie windows reproduce the dense resample's values exactly (same source cells and weights,
    so the same arithmetic) at random pixels, at scales whose float32 reciprocal is a short binary
    fraction (32/3 x ..., 4) and at ones where it is not (4 x 97/36: windows then start further back, or
    at the axis start, where the window's arithmetic is the full call's), enlarging and shrinking."""
    monkeypatch.setattr(stuff, "_MAX_WINDOW_SHARE", 1e9)  # exactness here, not the cost rule
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 5, 13, 16, generator=g) * 3
    resized = (48, 60)
    sf = (4 * original[0] / resized[0], 4 * original[1] / resized[1])
    x = F.pad(logits, (0, 1, 0, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
    dense = F.interpolate(x, scale_factor=sf, mode="bilinear", align_corners=False, recompute_scale_factor=False)
    taps = []
    for n, size, s in ((x.shape[2], original[0], sf[0]), (x.shape[3], original[1], sf[1])):
        t0, t1, tl = (t[:size].numpy() for t in stuff.source_taps(int(np.floor(float(n) * s)), n, s))
        taps.append((t0, t1, tl, n, s))
    points = torch.stack([torch.randint(0, original[0], (60,), generator=g),
                          torch.randint(0, original[1], (60,), generator=g)], 1).numpy()
    for src in (x, logits):  # the padded map and the map before padding
        values = stuff._kernel_values_at(src, points, tuple(taps))
        assert values is not None
        assert torch.equal(values, dense[0, :, points[:, 0], points[:, 1]].T)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_take_the_dense_path(stuff_path, bad: float) -> None:
    """A NaN or infinite logit: the C helper declines (-1) and the dense path gives the reference's labels."""
    logits = _region_logits(torch.Generator().manual_seed(6), 5, 12, 14)
    logits[3, 4, 9] = bad
    want = ref.stuff_labels_at(logits, (48, 56), (70, 90))
    assert torch.equal(stuff.stuff_label_map(logits, (48, 56), (70, 90)).long(), want)
    if stuff_path is not None:
        assert stuff_path.calls == 1 and stuff_path.decided == 0


def test_decide_labels_rejects_bad_buffers(stuff_native) -> None:
    """The C entry point checks its buffers: one-line TypeError / ValueError, nothing written out of range."""
    native = stuff_native.module
    logits = np.zeros((3, 4, 5), np.float32)
    logits[1] = 1.0  # class 1 leads everywhere
    t0, t1, tl = np.zeros(8, np.int64), np.ones(8, np.int64), np.full(8, 0.5, np.float32)
    out, near = np.zeros((8, 8), np.uint8), np.zeros((4, 2), np.int64)
    assert native.decide_labels(logits, t0, t1, tl, t0, t1, tl, 1e-5, out, near) == 0 and (out == 1).all()
    with pytest.raises(TypeError, match="float32"):
        native.decide_labels(logits.astype(np.float64), t0, t1, tl, t0, t1, tl, 1e-5, out, near)
    with pytest.raises(TypeError, match="ty0"):
        native.decide_labels(logits, t0.astype(np.int32), t1, tl, t0, t1, tl, 1e-5, out, near)
    with pytest.raises(ValueError, match="one length"):
        native.decide_labels(logits, t0[:7], t1, tl, t0, t1, tl, 1e-5, out, near)
    with pytest.raises(ValueError, match="outside"):
        native.decide_labels(logits, t0 + 5, t1, tl, t0, t1, tl, 1e-5, out, near)
    with pytest.raises(ValueError, match="out must be"):
        native.decide_labels(logits, t0, t1, tl, t0, t1, tl, 1e-5, np.zeros((8, 7), np.uint8), near)
    with pytest.raises(ValueError, match="out must be"):
        native.decide_labels(np.zeros((300, 4, 5), np.float32), t0, t1, tl, t0, t1, tl, 1e-5, out, near)
    with pytest.raises(ValueError, match="classes"):
        native.decide_labels(logits[:1], t0, t1, tl, t0, t1, tl, 1e-5, out, near)


def test_environment_switch(monkeypatch) -> None:
    """``SEPSNET_STUFF_NATIVE=0`` selects the NumPy form."""
    monkeypatch.setenv("SEPSNET_STUFF_NATIVE", "0")
    assert stuff.load_native() is None
