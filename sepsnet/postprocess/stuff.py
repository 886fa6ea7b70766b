"""Stuff labels at the original resolution (DESIGN "Inference split", step 4).

The stuff logits (1/4 of the padded input) are cropped to the valid (resized, unpadded) cells
and sampled bilinearly at original pixel centres (half-pixel rule, border clamp), then the
argmax over classes is taken. Up to ``_INTERP_BYTES`` of resized logits this is one
channels-last ``F.interpolate``; beyond it a ``grid_sample`` over row bands (bounded memory).
Labels are returned in the smallest integer type that holds the classes (uint8 for <= 256),
so a very large frame costs one byte per pixel here.

ATen's channels-last bilinear kernel runs one thread per batch item, so with several intra-op
threads the map is resampled as a batch of row tiles (:func:`_row_tiles`), each tile an input
row range whose output rows get exactly the source indices and weights of the full call
(checked with :func:`source_taps`, the kernel's index arithmetic): the same kernel then does the
same arithmetic on the same values, and the labels are identical. When no such split exists
(e.g. a scale that is not a power of two) the single call is used.

On CPU the labels are first decided without resampling every class (:func:`_decided_labels`, exact):
by the optional C helper ``_stuff_native.c`` (built by ``pip install``; ``NATIVE``) on the unpadded
logits, else by the NumPy form. ``SEPSNET_STUFF_NATIVE=0`` selects the NumPy form; both give the labels
of the dense path.
"""
from __future__ import annotations

import functools
import math
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from sepsnet.native import optional_extension
from sepsnet.postprocess.threads import one_intra_op_thread

_BAND_BYTES = 128 << 20  # float32 scratch per band of resized stuff logits (large maps)
_INTERP_BYTES = 768 << 20  # up to this, resize all stuff logits in one F.interpolate
STUFF_STRIDE = 4
_MARGIN = 1e-5  # x max |logit|: a lead kept through the kernel's rounding (a few float32 ulps, ~4e-7)
_MAX_UNDECIDED = 0.25  # above this share of pixels to interpolate here, the dense kernel is faster
_MAX_NEAR_TIES = 256  # pixels left to the kernel one by one; beyond, the dense kernel
_MAX_WINDOW_SHARE = 0.25  # near-tie windows resampling more than this share of the output: the dense kernel


def load_native() -> ModuleType | None:
    """The C helper ``_stuff_native`` when it was built and ``SEPSNET_STUFF_NATIVE`` is not ``0``, else None."""
    return optional_extension("sepsnet.postprocess._stuff_native", "SEPSNET_STUFF_NATIVE")


NATIVE = load_native()  # read at call time: tests set it to None for the NumPy form


def _valid_cells(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], stride: int
                 ) -> tuple[torch.Tensor, torch.dtype]:
    """The float32 logits (1, C, h, w) of the valid cells (the resized, unpadded image; a partly valid
    last cell is kept, the border clamp happens there) and the label dtype (uint8 up to 256 classes)."""
    rh, rw = resized_hw
    logits = stuff_logits[:, : math.ceil(rh / stride), : math.ceil(rw / stride)].float()[None]
    return logits, (torch.uint8 if logits.shape[1] <= 256 else torch.int64)


def stuff_label_map(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                    stride: int = STUFF_STRIDE) -> torch.Tensor:
    """Argmax of ``stuff_logits`` (C, hs, ws) (stride ``stride`` w.r.t. the padded input),
    cropped to the valid region and resampled ``resized_hw`` -> ``original_hw``: (oh, ow) labels,
    uint8 when C <= 256 (int64 otherwise)."""
    (rh, rw), (oh, ow) = resized_hw, original_hw
    logits, dtype = _valid_cells(stuff_logits, resized_hw, stride)
    c, dev = logits.shape[1], stuff_logits.device
    if c * oh * ow * 4 <= _INTERP_BYTES:
        sf = (stride * oh / rh, stride * ow / rw)
        native = NATIVE
        if dev.type == "cpu" and native is not None:
            with one_intra_op_thread(dev):  # a second thread costs more than it gives when a core is busy
                decided = _native_decided_labels(native, logits, (oh, ow), sf)
            if decided is not None:
                return decided
        if dev.type == "cpu" and native is None:
            # a replicated extra cell makes the resample cover (oh, ow) whatever rounding (as below)
            x = F.pad(logits, (0, 1, 0, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
            with one_intra_op_thread(dev):
                decided = _decided_labels(x, (oh, ow), sf, dtype)
            if decided is not None:
                return decided
    return resampled_labels(stuff_logits, resized_hw, original_hw, stride)


def resampled_labels(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                     stride: int = STUFF_STRIDE, row_tiles: bool = True) -> torch.Tensor:
    """:func:`stuff_label_map` by the resample of every class and the first maximum, with no
    data-dependent shortcut: the CPU fallback, and with ``row_tiles=False`` (no host-side tile
    check) the device path's form, free of host reads."""
    (rh, rw), (oh, ow) = resized_hw, original_hw
    logits, dtype = _valid_cells(stuff_logits, resized_hw, stride)
    c, hs, ws = logits.shape[1:]
    dev = stuff_logits.device
    if c * oh * ow * 4 <= _INTERP_BYTES:
        # one channels-last F.interpolate with the exact scale (same mapping as the grid below);
        # a replicated extra cell makes the output cover (oh, ow) whatever rounding
        x = F.pad(logits, (0, 1, 0, 1), mode="replicate").contiguous(memory_format=torch.channels_last)
        sf = (stride * oh / rh, stride * ow / rw)
        tiles = _row_tiles(x.shape[2], oh, sf[0], _intra_op_threads()) if row_tiles and dev.type == "cpu" else None
        if tiles is not None:
            n = tiles[0][2]
            batch = torch.cat([x[:, :, s:s + n] for _, s, _, _ in tiles]).contiguous(memory_format=torch.channels_last)
            up = F.interpolate(batch, scale_factor=sf, mode="bilinear", align_corners=False,
                               recompute_scale_factor=False).permute(0, 2, 3, 1)
            labels = torch.empty((oh, ow), dtype=dtype, device=dev)
            for b, (y0, _, _, k0) in enumerate(tiles):
                y1 = tiles[b + 1][0] if b + 1 < len(tiles) else oh
                labels[y0:y1] = up[b, k0:k0 + y1 - y0, :ow].max(-1).indices.to(dtype)
            return labels
        up = F.interpolate(x, scale_factor=sf, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        # index of the maximum over the contiguous channel axis of the channels-last result (same
        # values, same first-maximum rule as ``up[0, :, :oh, :ow].argmax(0)``; ``max`` is faster
        # than ``argmax`` there, both about twice as fast as over the strided axis)
        return up[0].permute(1, 2, 0)[:oh, :ow].max(-1).indices.to(dtype)
    # logit-map coordinate u of original pixel y: u = (y + 0.5) * (rh / oh) / stride - 0.5
    gx = (torch.arange(ow, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rw / (ow * stride * ws)) - 1.0
    gy_all = (torch.arange(oh, device=dev, dtype=torch.float32) + 0.5) * (2.0 * rh / (oh * stride * hs)) - 1.0
    labels = torch.empty((oh, ow), dtype=dtype, device=dev)
    band = max(1, _BAND_BYTES // max(1, 4 * ow * (c + 2)))
    for y0 in range(0, oh, band):
        gy = gy_all[y0:y0 + band]
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        vals = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels[y0:y0 + band] = vals[0].argmax(0).to(dtype)
    return labels


def _native_decided_labels(native: ModuleType, logits: torch.Tensor, out_hw: tuple[int, int],
                           sf: tuple[float, float]) -> torch.Tensor | None:
    """:func:`_decided_labels` by the C helper, on the cropped logits (1, C, hs, ws) as they are (any
    strides, no padded channels-last copy: the replicated extra cell of the dense path is the last
    cell read twice). Same decisions and proof, in one pass; near ties go to the kernel here. None
    when the dense path must run (one class, a NaN or infinite logit, too many near ties)."""
    (oh, ow), (c, h, w) = out_hw, logits.shape[1:]
    if c < 2 or h < 1 or w < 1:
        return None
    # the kernel's indices and weights on the padded map (h + 1, w + 1) of the dense path
    ty0, ty1, tly = (t[:oh].numpy() for t in source_taps(int(math.floor(float(h + 1) * sf[0])), h + 1, sf[0]))
    tx0, tx1, tlx = (t[:ow].numpy() for t in source_taps(int(math.floor(float(w + 1) * sf[1])), w + 1, sf[1]))
    if len(ty0) < oh or len(tx0) < ow:
        return None
    out = np.empty((oh, ow), np.uint8 if c <= 256 else np.int64)
    near = np.empty((_MAX_NEAR_TIES, 2), np.int64)
    n = native.decide_labels(logits[0].detach().numpy(), ty0, ty1, tly, tx0, tx1, tlx, _MARGIN, out, near)
    if n < 0:
        return None
    if n:  # near ties: the kernel decides, on a few cells around each pixel
        labels = _kernel_labels_at(logits, near[:n], ((ty0, ty1, tly, h + 1, sf[0]), (tx0, tx1, tlx, w + 1, sf[1])))
        if labels is None:
            return None
        out[near[:n, 0], near[:n, 1]] = labels
    return torch.from_numpy(out)


def _decided_labels(x: torch.Tensor, out_hw: tuple[int, int], sf: tuple[float, float],
                    dtype: torch.dtype) -> torch.Tensor | None:
    """The labels of ``F.interpolate(x, scale_factor=sf, bilinear)[..., :oh, :ow].max(channels)``
    (the dense path below) without resampling every class at every pixel; None when that would not
    pay (then the caller runs the dense path).

    Every output value is a sum of its 4 source cells with weights >= 0 summing to ~1, computed by the
    kernel with an error of a few float32 ulps of the largest |logit| (``bound``). So where the 4
    source cells of a pixel (:func:`source_taps`: the kernel's own indices) share their top class k,
    each ahead of its runner-up by more than ``_MARGIN`` x bound, the kernel's value of k is strictly
    the largest: the label is k, with no resampling. The other pixels are interpolated here (float32,
    the kernel's weights); where their top two are more than the margin apart, the kernel's maximum is
    the same. The few near ties left, where the kernel's rounding decides, get the kernel itself, run
    on a small window that gives the pixel the full call's source cells and weights."""
    oh, ow = out_hw
    c, h, w = x.shape[1:]
    cells = x[0].permute(1, 2, 0).reshape(h * w, c)  # the (h, w, C) channels-last memory, no copy
    bound = float(cells.abs().max())
    if c < 2 or not math.isfinite(bound):
        return None
    cell_lead, cell_top, cell_best = _lead(cells)
    labels = cell_top.reshape(h, w).numpy().astype(np.uint8 if c <= 256 else np.int64)
    good = (cell_lead > _MARGIN * bound).reshape(h, w).numpy()
    # a cell block (i..i+1, j..j+1) (edge-clamped) whose 4 cells agree with a margin
    lp, gp = np.pad(labels, ((0, 1), (0, 1)), mode="edge"), np.pad(good, ((0, 1), (0, 1)), mode="edge")
    block = (gp[:-1, :-1] & gp[1:, :-1] & gp[:-1, 1:] & gp[1:, 1:] & (lp[:-1, :-1] == lp[1:, :-1])
             & (lp[:-1, :-1] == lp[:-1, 1:]) & (lp[:-1, :-1] == lp[1:, 1:]))
    if block.mean() < 1.0 - _MAX_UNDECIDED:
        return None
    ty0, ty1, tly = (t[:oh].numpy() for t in source_taps(int(math.floor(float(h) * sf[0])), h, sf[0]))
    tx0, tx1, tlx = (t[:ow].numpy() for t in source_taps(int(math.floor(float(w) * sf[1])), w, sf[1]))
    if len(ty0) < oh or len(tx0) < ow:
        return None
    out = np.take(labels[ty0], tx0, axis=1)  # rows, then columns: two cheap gathers
    ys, xs = _pixels_of_blocks(~block, ty0, tx0)
    if len(ys) > _MAX_UNDECIDED * oh * ow:
        return None
    if len(ys):
        ys, xs = _not_sure_of_corner_class(out, ys, xs, (ty0, ty1, tly), (tx0, tx1, tlx), cells, w,
                                           (cell_lead, cell_top, cell_best), _MARGIN * bound)
    if len(ys):
        # float32 like the kernel: both within ~4e-7 x bound of the exact sums, far inside the margin
        ly = torch.from_numpy(tly[ys])[:, None]
        lx = torch.from_numpy(tlx[xs])[:, None]
        r0, r1 = torch.from_numpy(ty0[ys] * w), torch.from_numpy(ty1[ys] * w)
        c0, c1 = torch.from_numpy(tx0[xs]), torch.from_numpy(tx1[xs])
        vals = ((1 - ly) * ((1 - lx) * cells.index_select(0, r0 + c0) + lx * cells.index_select(0, r0 + c1))
                + ly * ((1 - lx) * cells.index_select(0, r1 + c0) + lx * cells.index_select(0, r1 + c1)))
        lead, top, _ = _lead(vals)
        near = (lead <= _MARGIN * bound).numpy()
        out[ys, xs] = top.numpy()
        if near.any():  # near ties: the kernel decides, run on a few cells around each such pixel
            if near.sum() > _MAX_NEAR_TIES:
                return None
            labels = _kernel_labels_at(x, np.stack([ys[near], xs[near]], 1),
                                       ((ty0, ty1, tly, h, sf[0]), (tx0, tx1, tlx, w, sf[1])))
            if labels is None:
                return None
            out[ys[near], xs[near]] = labels
    return torch.from_numpy(out).to(dtype)


def _pixels_of_blocks(blocks: np.ndarray, ty0: np.ndarray, tx0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the output pixels whose first source cell (``ty0[y]``, ``tx0[x]``, non-decreasing)
    is a True cell of ``blocks``: each cell's pixels are a rectangle, listed without a full-size scan."""
    bi, bj = np.nonzero(blocks)
    r0, r1 = np.searchsorted(ty0, bi, "left"), np.searchsorted(ty0, bi, "right")
    c0, c1 = np.searchsorted(tx0, bj, "left"), np.searchsorted(tx0, bj, "right")
    width = c1 - c0
    counts = (r1 - r0) * width
    owner = np.repeat(np.arange(len(bi)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return r0[owner] + offset // width[owner], c0[owner] + offset % width[owner]


def _lead(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``rows`` (n, C): how far the largest value is ahead of the next one (0 for a tie),
    its index (the first maximum) and the value. Two ``max`` passes; faster than ``topk(2)`` here."""
    best = rows.max(dim=1)
    rest = rows.scatter(1, best.indices[:, None], float("-inf")).amax(dim=1)
    return best.values - rest, best.indices, best.values


def _not_sure_of_corner_class(out: np.ndarray, ys: np.ndarray, xs: np.ndarray, rows: tuple, cols: tuple,
                              cells: torch.Tensor, width: int, per_cell: tuple, margin: float
                              ) -> tuple[np.ndarray, np.ndarray]:
    """The pixels among (ys, xs) whose label in ``out`` (their first source cell's class A) is not
    proven. A's lead over any class c at a cell is at least A's lead over that cell's best other class
    (``m_A``: the cell's lead when A is its top class, else A's value minus the top value), so the
    weighted sum of the 4 cells' ``m_A`` bounds the pixel's lead of A from below: above ``margin``, A
    wins at the pixel (as for agreeing cells). One float per cell instead of every class."""
    (ty0, ty1, tly), (tx0, tx1, tlx) = rows, cols
    lead, top, best = (t.numpy() for t in per_cell)
    flat = cells.numpy().reshape(-1)
    c = cells.shape[1]
    a = out[ys, xs].astype(np.int64)
    ly, lx = tly[ys], tlx[xs]
    total = np.zeros(len(ys), np.float32)
    for r, cc, weight in ((ty0[ys], tx0[xs], (1 - ly) * (1 - lx)), (ty0[ys], tx1[xs], (1 - ly) * lx),
                          (ty1[ys], tx0[xs], ly * (1 - lx)), (ty1[ys], tx1[xs], ly * lx)):
        cell = r * width + cc
        m = np.where(top[cell] == a, lead[cell], flat[cell * c + a] - best[cell])
        total += weight * m
    unsure = ~(total > margin)
    return ys[unsure], xs[unsure]


@functools.lru_cache(maxsize=64)
def _window_taps(cells: int, sf: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`source_taps` of a window of ``cells`` source cells (read-only arrays, kept per size)."""
    taps = tuple(t.numpy() for t in source_taps(int(math.floor(float(cells) * sf)), cells, sf))
    for t in taps:
        t.flags.writeable = False
    return taps


_WINDOW_SEARCH = 16  # window starts tried one by one before the axis start (which always matches)


def _local_windows(idx: np.ndarray, taps: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index in ``idx`` along one axis: a source window (first cell, cells) around it and the
    index ``k`` of that output in the window's own resample, such that it gets the source cells and
    weight of the full call (same kernel arithmetic then): (first, cells, k) arrays. The window starts
    a cell before the index's first source cell (no clamping there unless the map's own) and ends a
    cell after its second; where the window's float32 source coordinate rounds differently from the
    full call's (a scale whose reciprocal is no short binary fraction), earlier starts are tried, and
    at last the axis start: there the window's arithmetic is the full call's own."""
    t0, t1, tl, n_in, sf = taps
    g0, g1 = t0[idx].astype(np.int64), t1[idx].astype(np.int64)
    first = np.maximum(0, g0 - 1)
    end = np.minimum(n_in, g1 + 2)  # and a cell after, unless the map ends there
    cells = end - first
    guess = np.round((idx + 0.5) - first * sf).astype(np.int64)
    k = np.full(len(idx), -1, np.int64)
    for size in np.unique(cells).tolist():
        l0, l1, ll = _window_taps(size, sf)
        of_size = cells == size
        for d in range(-3, 4):  # the first matching index from guess - 3 on
            kk = guess + d
            inside = of_size & (k < 0) & (kk >= 0) & (kk < len(l0))
            at = np.where(inside, kk, 0)
            k = np.where(inside & (l0[at] + first == g0) & (l1[at] + first == g1) & (ll[at] == tl[idx]), kk, k)
    for n in np.flatnonzero(k < 0).tolist():
        i, lam = int(idx[n]), float(tl[idx[n]])
        starts = [*range(int(first[n]) - 1, max(0, int(first[n]) - 1 - _WINDOW_SEARCH), -1), 0]
        for start in starts:
            l0, l1, ll = _window_taps(int(end[n]) - start, sf)
            g = int(round((i + 0.5) - start * sf))
            found = [kk for kk in range(max(0, g - 3), min(len(l0), g + 4))
                     if l0[kk] + start == g0[n] and l1[kk] + start == g1[n] and float(ll[kk]) == lam]
            if found:
                first[n], cells[n], k[n] = start, int(end[n]) - start, found[0]
                break
    return first, cells, k


def _kernel_labels_at(x: torch.Tensor, points: np.ndarray, taps: tuple) -> np.ndarray | None:
    """The dense path's labels of output pixels ``points`` (n, 2) (y, x), from :func:`_kernel_values_at`
    (first maximum over the classes, as the dense path takes it); None where that gives None."""
    values = _kernel_values_at(x, points, taps)
    return None if values is None else values.max(-1).indices.numpy()


def _kernel_values_at(x: torch.Tensor, points: np.ndarray, taps: tuple) -> torch.Tensor | None:
    """The dense path's class values (n, C) at output pixels ``points`` (n, 2) (y, x), bit for bit: the
    kernel run on small windows of the padded map whose resample gives each pixel the full call's
    source cells and weights (:func:`_local_windows`; windows of one size batched in one call: the
    kernel does each batch item alone); None if a pixel has no such window or the windows would cost
    more than the dense call. ``x`` (1, C, H, W) is the padded map or the map before padding: indices
    past its end read its last row / column, which is what the replicated padding holds."""
    wy, wx = _local_windows(points[:, 0], taps[0]), _local_windows(points[:, 1], taps[1])
    sf = (taps[0][4], taps[1][4])
    if (wy[2] < 0).any() or (wx[2] < 0).any():
        return None
    volume = (np.floor(wy[1] * sf[0]) * np.floor(wx[1] * sf[1])).sum()
    if volume > _MAX_WINDOW_SHARE * len(taps[0][0]) * len(taps[1][0]):
        return None  # windows from the axis starts: the dense path costs less
    values = torch.empty(len(points), x.shape[1], dtype=x.dtype)
    shapes = np.stack([wy[1], wx[1]], 1)
    for cy, cx in np.unique(shapes, axis=0).tolist():
        members = np.flatnonzero((shapes[:, 0] == cy) & (shapes[:, 1] == cx))
        rows = (torch.from_numpy(wy[0][members])[:, None] + torch.arange(cy)).clamp(max=x.shape[2] - 1)
        cols = (torch.from_numpy(wx[0][members])[:, None] + torch.arange(cx)).clamp(max=x.shape[3] - 1)
        crops = x[0][:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)  # (n, C, cy, cx)
        up = F.interpolate(crops.contiguous(memory_format=torch.channels_last), scale_factor=sf, mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)
        values[torch.from_numpy(members)] = up.permute(0, 2, 3, 1)[
            torch.arange(len(members)), torch.from_numpy(wy[2][members]), torch.from_numpy(wx[2][members])]
    return values


def stuff_labels_at(stuff_logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int],
                    stride: int = STUFF_STRIDE) -> torch.Tensor:
    """:func:`stuff_label_map` as int64 (oh, ow)."""
    return stuff_label_map(stuff_logits, resized_hw, original_hw, stride).long()


def _intra_op_threads() -> int:
    return torch.get_num_threads()


def source_taps(out_n: int, in_n: int, sf: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output index of ``F.interpolate(scale_factor=sf, mode="bilinear", align_corners=False,
    recompute_scale_factor=False)`` along one axis: the two source indices and the weight of the
    second, as ATen's CPU kernel computes them (float32 scale ``1/sf``, half-pixel source index in
    double rounded to float32, clamped at 0, floor guarded to the last cell; a same-size axis is
    copied)."""
    if out_n == in_n:
        i0 = torch.arange(out_n)
        return i0, i0.clone(), torch.zeros(out_n, dtype=torch.float32)
    scale = float(torch.tensor(1.0 / sf, dtype=torch.float32))
    src = (scale * (torch.arange(out_n, dtype=torch.float64) + 0.5) - 0.5).float().clamp(min=0)
    i0 = src.floor().long().clamp(max=in_n - 1)
    lam = (src - i0.float()).clamp(0, 1)
    return i0, i0 + (i0 < in_n - 1).long(), lam


def _row_tiles(in_h: int, oh: int, sf: float, parts: int) -> list[tuple[int, int, int, int]] | None:
    """Split the ``oh`` output rows of a resample of ``in_h`` input rows into ``parts`` tiles of one
    common input height: per tile ``(first output row, first input row, input rows, row of the
    first output row in the tile's own output)``, such that every output row gets the same source
    rows (shifted) and weight as in the full call (:func:`source_taps`); None when no exact split
    is found or splitting is not worth it."""
    if parts < 2 or oh < 64 * parts:
        return None
    full_out = int(math.floor(float(in_h) * sf))
    f0, f1, fl = source_taps(full_out, in_h, sf)
    firsts = [oh * p // parts for p in range(parts)]
    ends = firsts[1:] + [oh]
    # one input height for all tiles, enough for each tile's source rows plus one; the last tile
    # reaches the bottom border (same clamping there)
    n = max(in_h - max(0, int(f0[firsts[-1]]) - 1),
            *(int(f1[e - 1]) + 2 - max(0, int(f0[y0]) - 1) for y0, e in zip(firsts, ends)))
    if n >= in_h:
        return None
    tiles = [(y0, min(max(0, int(f0[y0]) - 1), in_h - n), n, 0) for y0 in firsts]
    out_n = int(math.floor(float(n) * sf))
    t0, t1, tl = source_taps(out_n, n, sf)
    checked = []
    for p, (y0, start, _, _) in enumerate(tiles):
        y1 = tiles[p + 1][0] if p + 1 < len(tiles) else oh
        found = None
        for k0 in range(max(0, int(round(y0 - start * sf)) - 3), int(round(y0 - start * sf)) + 4):
            k1 = k0 + y1 - y0
            if k0 < 0 or k1 > out_n:
                continue
            if (torch.equal(t0[k0:k1] + start, f0[y0:y1]) and torch.equal(t1[k0:k1] + start, f1[y0:y1])
                    and torch.equal(tl[k0:k1], fl[y0:y1])):
                found = k0
                break
        if found is None:
            return None
        checked.append((y0, start, n, found))
    return checked
