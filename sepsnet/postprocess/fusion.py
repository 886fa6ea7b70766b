"""Panoptic fusion, Panoptic-FPN style (DESIGN "Inference split", step 4).

Same semantics as detectron2's ``combine_semantic_and_instance_outputs``:
1. instances with score >= ``instance_score_thresh`` are visited by descending score; an
   instance is skipped when the fraction of its mask already taken by earlier segments is
   above ``overlap_thresh`` (intersection / mask area); otherwise it gets its pixels not yet
   taken;
2. every stuff class of the stuff head's argmax (labels ``0..S-1``; label ``S`` = "thing" and
   anything outside ``[0, S)`` is ignored) gets the still-void pixels of that class when they
   are at least ``stuff_area_limit`` pixels.
Output: int32 id map (0 = void, ids 1..n in the order the segments were created) and
``segments_info`` (``id``, contiguous ``category_id``, ``isthing``, ``score`` (1.0 for stuff),
``area``, ``bbox`` [x, y, w, h]).

Fast and memory-bounded form of the same rule: each instance is fused on its box crop against
the running occupancy (the id map itself), its area and bbox taken from the pixels it kept
(stuff never overwrites a thing); stuff areas and bboxes come from per-row and per-column
counts of the void pixels of each class, in row bands, so no full-image plane per class or per
instance is ever made. On CPU (:func:`_fuse_host`) the occupancy is a byte map written by OpenCV
under each kept crop, and the stuff pass gives every pixel one byte code (thing, void stuff class
or nothing) whose histogram, per-row/per-column bit ORs and one lookup table give the areas, bboxes
and ids (same output), in row strips shared among the host threads the caller allows.

No host synchronisation until the end (issue 13): the keep/skip decision of each instance, its
segment id (a running count on the device), kept area and bbox stay tensors on the id map's
device; a skipped instance writes nothing (its write mask is all False). Stuff ids and areas are
likewise made on the device, and one transfer at the end (:func:`_segments_info`) turns all of
it into ``segments_info``. The order of visits and the crop regions are host values the caller
already has (scores and boxes), so no tensor value is read while fusing.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from sepsnet.errors import ConfigError
from sepsnet.postprocess.candidates import postprocess_cfg
from sepsnet.postprocess.paste import PastedMasks
from sepsnet.postprocess.threads import host_workers, on_host_workers, one_intra_op_thread


def _num_stuff(cfg: Any, num_stuff_classes: int | None) -> int:
    if num_stuff_classes is not None:
        return int(num_stuff_classes)
    model = getattr(cfg, "model", None)
    if model is not None and hasattr(model, "num_stuff_classes"):
        return int(model.num_stuff_classes)
    raise ConfigError("panoptic_fusion: pass num_stuff_classes= or a full SEPSNetConfig "
                      "(model.num_stuff_classes) so the 'thing' label S of the stuff map is known")


#: label pixels per band of the stuff pass (bounds the int32 scratch at any image size)
BAND_PIXELS = 1 << 22
#: label pixels per strip of the CPU stuff pass: below the size from which OpenCV's LUT and
#: calcHist split work over its own thread pool (one thread here, as for torch in the fusion)
HOST_STRIP_PIXELS = 1 << 17
#: on CPU, up to this many instances to visit the things pass keeps its occupancy in bytes
BYTE_OCCUPANCY_VISITS = 255
#: on CPU, a strip of the stuff pass with more runs of equal codes than this fraction of its pixels is
#: counted by byte kernels (calcHist, bit lookups) instead of per run
MAX_RUN_FRACTION = 1 / 16
#: on CPU, the things visited plus the stuff classes up to which the stuff pass uses byte codes
BYTE_CODE_SEGMENTS = 255
#: on CPU, label pixels per host worker thread from which the stuff pass's strips are shared among
#: the intra-op threads the caller allows
HOST_SPLIT_PIXELS = 1 << 18
#: on CPU read values as they come (no device to wait for) and leave skipped instances at once;
#: False runs the deferred-read form used on other devices (tests run it on CPU)
READ_ON_CPU = True


def _first_last(flags: torch.Tensor) -> torch.Tensor:
    """First and last index of True in a 1-d bool tensor, as a (2,) long tensor (no host read;
    meaningless when none is True)."""
    n = flags.numel()
    f = flags.to(torch.uint8)
    return torch.stack([f.argmax(), n - 1 - f.flip(0).argmax()])


def _fuse_things_host(masks: PastedMasks, order: list[int], own: np.ndarray,
                      pp: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """:func:`_fuse_things` on CPU with NumPy views of the same memory: one thread, microsecond
    calls, values read as they come and a skipped instance left at once. ``own``: the running
    occupancy (segment ids, 0 = free) the caller made, bytes up to 255 visits (see :func:`_fuse_host`)
    or the int32 id map, so a pixel is kept where ``mask byte (0/1) > occupancy``; OpenCV counts
    the kept pixels and takes their bbox. On bytes OpenCV also compares and writes the segment id
    under the kept pixels (``occupancy | (kept & id)``: kept pixels hold 0, kept is 255 or 0)."""
    areas = masks.areas
    visits: list[int] = []
    rows: list[list[int]] = []
    byte_map = own.dtype == np.uint8
    for i in order:
        x0, y0, x1, y1 = masks.regions[i]
        area = areas[i]
        if area == 0:
            continue
        occupied = own[y0:y1, x0:x1]
        crop = masks.crop(i).numpy().view(np.uint8)
        if byte_map:
            kept_u8 = cv2.compare(crop, occupied, cv2.CMP_GT)  # 255 where kept
        else:
            kept = np.greater(crop, occupied)
            kept_u8 = kept.view(np.uint8)
        k = cv2.countNonZero(kept_u8)
        if k == 0 or (area - k) / area > pp.overlap_thresh:
            continue
        if byte_map:  # kept pixels hold 0: OR the id in (unmasked kernels; OpenCV's masked ones are slower)
            cv2.bitwise_or(occupied, cv2.bitwise_and(kept_u8, len(visits) + 1), dst=occupied)
        else:
            np.copyto(occupied, len(visits) + 1, where=kept)
        bx, by, bw, bh = cv2.boundingRect(kept_u8)
        rows.append([1, k, y0 + by, y0 + by + bh - 1, x0 + bx, x0 + bx + bw - 1])
        visits.append(i)
    stats = torch.tensor(rows, dtype=torch.long).reshape(-1, 6)
    return visits, stats, torch.tensor(len(visits), dtype=torch.int32)


def _visit_order(masks: PastedMasks, scores: list[float], pp: Any) -> list[int]:
    """Instances to visit: score >= ``instance_score_thresh``, by descending score, non-empty region."""
    order = []
    for i in sorted(range(len(masks)), key=lambda i: -scores[i]):
        if scores[i] < pp.instance_score_thresh:
            break
        x0, y0, x1, y1 = masks.regions[i]
        if x1 > x0 and y1 > y0:
            order.append(i)
    return order


def _fuse_things(masks: PastedMasks, order: list[int], id_map: torch.Tensor,
                 pp: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Step 1 of the module docstring, on box crops against the running occupancy ``id_map``.
    Returns the visited instances (host indices), per visit int64 (v, 6) ``[kept, area, y0, y1,
    x0, x1]`` and the number of segments made (0-dim), on ``id_map``'s device, read by no one
    until :func:`_segments_info`."""
    device = id_map.device
    count = torch.zeros((), dtype=torch.int32, device=device)
    rows: list[torch.Tensor] = []
    areas = masks.area_tensor() if order else None
    for i in order:
        x0, y0, x1, y1 = masks.regions[i]
        area = areas[i]
        occupied = id_map[y0:y1, x0:x1]
        kept = masks.crop(i) & (occupied == 0)
        kept_area = kept.sum()
        # skip when (area - kept) / area > overlap_thresh or nothing is left (float64 as in Python)
        ok = (kept_area > 0) & ((area - kept_area).double() / area.double() <= pp.overlap_thresh)
        count += ok
        write = kept & ok
        occupied.copy_(torch.where(write, count, occupied))  # (masked_fill_ reads a tensor value on the host)
        rows.append(torch.cat([ok.long()[None], kept_area[None], _first_last(write.any(dim=1)) + y0,
                               _first_last(write.any(dim=0)) + x0]))
    stats = torch.stack(rows) if rows else torch.zeros((0, 6), dtype=torch.long, device=device)
    return order, stats, count


def _count(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of each value ``0..n-1`` of int ``keys`` (all in range): ``bincount`` on CPU; a
    scatter-add elsewhere (CUDA ``bincount`` reads the maximum on the host to size its output)."""
    if keys.device.type == "cpu" and READ_ON_CPU:
        return torch.bincount(keys, minlength=n)
    return torch.zeros(n, dtype=torch.long, device=keys.device).index_add_(
        0, keys.long(), torch.ones(1, dtype=torch.long, device=keys.device).expand(keys.numel()))


def _stuff_codes(lab: np.ndarray, own: np.ndarray, num_stuff: int, base: int, out: np.ndarray) -> None:
    """One strip of the code map of :func:`_fuse_stuff_host`: ``own - 1`` on things (bytes wrap,
    so a free pixel gives 255), ``base + c`` on void pixels of stuff class ``c``, 255 on the other
    void pixels, as the minimum of the two (``base`` is the number of things, so a thing's code is
    below every stuff code). Stuff codes by saturating byte kernels, no lookup table: ``lab + base``,
    then 255 wherever ``lab >= S`` (labels of another integer dtype are brought to bytes first)."""
    if lab.dtype != np.uint8:  # any other integer dtype: outside [0, S) -> 255
        lab = np.where((lab >= 0) & (lab < num_stuff), lab, 255).astype(np.uint8)
    lab = np.ascontiguousarray(lab)
    stuff = cv2.max(cv2.add(lab, base), cv2.threshold(lab, num_stuff - 1, 255, cv2.THRESH_BINARY)[1])
    np.minimum(stuff, own - np.uint8(1), out=out)


def _code_runs(flat: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Runs of equal codes in a strip (rows of ``w`` pixels, flattened), each row starting a run:
    their first pixels and lengths, or None when there are more than :data:`MAX_RUN_FRACTION` of the
    pixels (noise: bytes kernels are then the faster)."""
    change = flat[1:] != flat[:-1]
    change[w - 1::w] = True  # the boundary before each row's first pixel
    ends = np.flatnonzero(change)
    if ends.size + 1 > flat.size * MAX_RUN_FRACTION:
        return None
    starts = np.empty(ends.size + 1, dtype=np.int64)
    starts[0] = 0
    np.add(ends, 1, out=starts[1:])
    return starts, np.diff(starts, append=flat.size)


def _fuse_stuff_host(stuff_labels: torch.Tensor, own: np.ndarray, ids: np.ndarray, num_stuff: int, things: int,
                     pp: Any, workers: int = 1) -> torch.Tensor:
    """:func:`_fuse_stuff` on CPU when ``things + num_stuff <= 255``, with OpenCV byte kernels on
    NumPy views, in row strips of at most :data:`HOST_STRIP_PIXELS` pixels (or one row), shared
    among ``workers`` host threads. Every pixel gets one byte code (:func:`_stuff_codes`): the
    thing's visit, the void pixel's stuff class, or 255. A strip made of long runs of equal codes
    (:func:`_code_runs`: stuff regions and masks) is counted per run: the histogram of the codes
    weighted by run length gives the class areas, each stuff run marks its row and its column
    range (one difference array per class, summed at the end) for the bboxes. Other strips take
    ``calcHist`` (float32 bins, exact for strips of at most 2**24 pixels) and per-row and per-column
    bitwise ORs of one bit per class (8, 16 or 32 classes per word). One lookup table then turns the
    codes into segment ids. ``own``: the things' byte occupancy (:func:`_fuse_host`, ``things``
    segments); ``ids`` (int32, any content) gets every pixel's segment id (0 = void)."""
    h, w = ids.shape
    if h == 0 or w == 0:
        return torch.zeros((num_stuff, 6), dtype=torch.long)
    word = np.uint8 if num_stuff <= 8 else np.uint16 if num_stuff <= 16 else np.uint32
    bits_per_word = 8 * np.dtype(word).itemsize
    words = -(-num_stuff // bits_per_word)
    bit_luts = np.zeros((words, 256), dtype=word)
    for c in range(num_stuff):
        bit_luts[c // bits_per_word, things + c] = 1 << (c % bits_per_word)
    if word is np.uint32:
        bit_luts = bit_luts.view(np.int32)  # OpenCV has no uint32 lookup table; the bits are the same
    code = np.empty((h, w), dtype=np.uint8)
    row_present = np.zeros((num_stuff, h), dtype=bool)
    band = max(1, min(BAND_PIXELS, HOST_STRIP_PIXELS) // w)
    strips = [(s, min(h, s + band)) for s in range(0, h, band)]
    parts = _split(strips, workers)
    found: list[tuple] = [None] * len(parts)

    def first_pass(k: int) -> None:
        hist = np.zeros(256, dtype=np.int64)
        col_bits = np.zeros((words, w), dtype=word)
        edges: list[np.ndarray] = []  # per stuff run: class * (w + 1) + first column, then + end column
        for s, e in parts[k]:
            c = code[s:e]
            _stuff_codes(stuff_labels[s:e].numpy(), own[s:e], num_stuff, things, c)
            flat = c.reshape(-1)
            runs = _code_runs(flat, w)
            if runs is not None:
                starts, lengths = runs
                vals = flat[starts]
                hist += np.bincount(vals, weights=lengths, minlength=256).astype(np.int64)  # exact below 2**53
                sel = (vals >= things) & (vals < things + num_stuff)
                if sel.any():
                    first, cls = starts[sel], vals[sel].astype(np.int64) - things
                    row_present[cls, s + first // w] = True
                    x0 = first % w
                    edges.append(np.concatenate([cls * (w + 1) + x0, cls * (w + 1) + x0 + lengths[sel]]))
                continue
            hist += cv2.calcHist([c], [0], None, [256], [0, 256])[:, 0].astype(np.int64)
            for wd in range(words):
                bits = cv2.LUT(c, bit_luts[wd]).view(word)
                rows = np.bitwise_or.reduce(bits, axis=1)
                for cl in range(wd * bits_per_word, min(num_stuff, (wd + 1) * bits_per_word)):
                    row_present[cl, s:e] |= (rows & word(1 << (cl % bits_per_word))) != 0
                col_bits[wd] |= np.bitwise_or.reduce(bits, axis=0)
        found[k] = (hist, col_bits, edges)

    on_host_workers(first_pass, list(range(len(parts))))
    counts = sum(f[0] for f in found)[things:things + num_stuff]
    col_bits = np.bitwise_or.reduce(np.stack([f[1] for f in found]), axis=0)
    edges = [a for f in found for a in f[2]]
    col_cover = np.zeros(num_stuff * (w + 1), dtype=np.int64)
    if edges:  # +1 at each run's first column, -1 past its last; a prefix sum > 0 is a covered column
        both = np.concatenate(edges)
        half = [len(a) // 2 for a in edges]
        sign = np.concatenate([np.repeat(np.array([1, -1], dtype=np.int64), [m, m]) for m in half])
        col_cover = np.bincount(both, weights=sign, minlength=num_stuff * (w + 1)).astype(np.int64)
    col_present = np.cumsum(col_cover.reshape(num_stuff, w + 1), axis=1)[:, :w] > 0
    taken = (counts > 0) & (counts >= pp.stuff_area_limit)
    id_lut = np.zeros(256, dtype=np.int32)
    id_lut[:things] = np.arange(1, things + 1)
    id_lut[things:things + num_stuff] = np.where(taken, things + np.cumsum(taken), 0)

    def second_pass(k: int) -> None:
        for s, e in parts[k]:
            cv2.LUT(code[s:e], id_lut, dst=ids[s:e])

    on_host_workers(second_pass, list(range(len(parts))))
    stats = np.zeros((num_stuff, 6), dtype=np.int64)
    stats[:, 0], stats[:, 1] = taken, counts
    for c in np.flatnonzero(counts):
        ys = np.flatnonzero(row_present[c])
        xs = np.flatnonzero(col_present[c] | ((col_bits[c // bits_per_word] & word(1 << (c % bits_per_word))) != 0))
        stats[c, 2:] = ys[0], ys[-1], xs[0], xs[-1]
    return torch.from_numpy(stats)


def _split(items: list, parts: int) -> list[list]:
    """``items`` in at most ``parts`` contiguous runs of near-equal length (none empty)."""
    parts = max(1, min(parts, len(items)))
    step, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + step + (k < extra)
        out.append(items[start:end])
        start = end
    return out


def _fuse_stuff(stuff_labels: torch.Tensor, id_map: torch.Tensor, num_stuff: int, first_id: torch.Tensor,
                pp: Any) -> torch.Tensor:
    """Step 2 of the module docstring: stuff classes take the still-void pixels, in row bands.
    Pass 1 counts every class's void pixels per row and per column (area and bbox); pass 2 adds
    the segment ids of the classes that reach ``stuff_area_limit`` (0 for the others) to the
    void pixels. ``first_id``: device scalar, the id of the first stuff segment. Returns int64
    (S, 6) ``[taken, area, y0, y1, x0, x1]`` per stuff class, on the device."""
    h, w = id_map.shape
    device = id_map.device
    if h == 0 or w == 0:
        return torch.zeros((num_stuff, 6), dtype=torch.long, device=device)
    k = num_stuff + 1
    band = max(1, BAND_PIXELS // max(1, w))
    row_counts = torch.zeros((h, k), dtype=torch.long, device=device)
    col_counts = torch.zeros((w, k), dtype=torch.long, device=device)
    col_key = torch.arange(w, device=device, dtype=torch.int32) * k
    row_key = torch.arange(h, device=device, dtype=torch.int32)[:, None] * k
    masked = torch.empty((h, w), dtype=torch.uint8 if k <= 256 else torch.int32, device=device)
    signed = stuff_labels.dtype.is_signed
    for s in range(0, h, band):
        e = min(h, s + band)
        lab = stuff_labels[s:e]
        is_stuff = (id_map[s:e] == 0) & (lab < num_stuff)
        if signed:
            is_stuff &= lab >= 0
        m = lab.to(masked.dtype).masked_fill(~is_stuff, num_stuff)  # (torch.where with a scalar goes via int64)
        masked[s:e] = m
        m32 = m.to(torch.int32)
        row_counts[s:e] = _count((m32 + row_key[: e - s]).view(-1), (e - s) * k).view(e - s, k)
        col_counts += _count((m32 + col_key).view(-1), w * k).view(w, k)
    counts = row_counts[:, :num_stuff].sum(0)
    taken = (counts > 0) & (counts >= pp.stuff_area_limit)
    ids = (first_id + torch.cumsum(taken, 0) - 1).to(torch.int32)
    lut = torch.zeros(k, dtype=torch.int32, device=device)
    lut[:num_stuff] = torch.where(taken, ids, 0)
    for s in range(0, h, band):  # void pixels hold 0, the others get lut[num_stuff] = 0
        e = min(h, s + band)
        id_map[s:e] += lut.index_select(0, masked[s:e].reshape(-1).to(torch.int32)).view(e - s, w)
    present_r = (row_counts[:, :num_stuff] > 0).to(torch.uint8)
    present_c = (col_counts[:, :num_stuff] > 0).to(torch.uint8)
    return torch.stack([taken.long(), counts, present_r.argmax(0), h - 1 - present_r.flip(0).argmax(0),
                        present_c.argmax(0), w - 1 - present_c.flip(0).argmax(0)], 1)


def _fuse_host(masks: PastedMasks, order: list[int], stuff_labels: torch.Tensor, num_stuff: int, pp: Any,
               workers: int = 1) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Both steps on CPU: things against a byte occupancy map when at most
    :data:`BYTE_OCCUPANCY_VISITS` instances are visited (else the int32 id map itself), then the
    OpenCV stuff pass, which writes every pixel's id, things' included, when the segments fit in
    byte codes (the generic stuff pass otherwise, or past 2**24-pixel rows). Returns the int32 id
    map, visits, thing and stuff statistics, count."""
    h, w = stuff_labels.shape
    byte_map = len(order) <= BYTE_OCCUPANCY_VISITS
    own = np.zeros((h, w), dtype=np.uint8) if byte_map else None
    id_map = torch.empty((h, w), dtype=torch.int32) if byte_map else torch.zeros((h, w), dtype=torch.int32)
    ids = id_map.numpy()
    visits, thing_stats, count = _fuse_things_host(masks, order, ids if own is None else own, pp)
    if own is not None and 0 < num_stuff and len(visits) + num_stuff <= BYTE_CODE_SEGMENTS and w <= 1 << 24:
        return id_map, visits, thing_stats, count, _fuse_stuff_host(stuff_labels, own, ids, num_stuff, len(visits),
                                                                    pp, workers)
    if own is not None:
        np.copyto(ids, own)
    stuff_stats = _fuse_stuff(stuff_labels, id_map, num_stuff, count + 1, pp) if num_stuff > 0 else None
    return id_map, visits, thing_stats, count, stuff_stats


def _segments_info(visits: list[int], thing_stats: torch.Tensor, stuff_stats: torch.Tensor | None,
                   scores: list[float], classes: list[int]) -> list[dict[str, Any]]:
    """The one host transfer of the fusion: device statistics -> ``segments_info``."""
    both = thing_stats if stuff_stats is None else torch.cat([thing_stats, stuff_stats])
    rows = both.cpu().tolist()
    segments: list[dict[str, Any]] = []
    for i, (ok, area, y0, y1, x0, x1) in zip(visits, rows):
        if ok:
            segments.append({"id": len(segments) + 1, "category_id": int(classes[i]), "isthing": True,
                             "score": float(scores[i]), "area": area, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    for c, (ok, area, y0, y1, x0, x1) in enumerate(rows[len(visits):]):
        if ok:
            segments.append({"id": len(segments) + 1, "category_id": c, "isthing": False, "score": 1.0,
                             "area": area, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1]})
    return segments


def panoptic_fusion(
    masks: torch.Tensor | PastedMasks,
    scores: torch.Tensor,
    classes: torch.Tensor,
    stuff_labels: torch.Tensor,
    cfg: Any,
    num_stuff_classes: int | None = None,
    regions: torch.Tensor | None = None,
    host_scores: list[float] | None = None,
    host_classes: list[int] | None = None,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Fuse instance masks with the stuff argmax ``stuff_labels`` (h, w) (any integer dtype).

    ``masks``: :class:`PastedMasks` (crops per box, what the pipeline passes) or bool (n, h, w)
    planes, then ``regions`` optionally gives int (n, 4) [x0, y0, x1, y1) boxes containing each
    mask (tight boxes when None). ``cfg``: full config or postprocess section (then give
    ``num_stuff_classes``). Work is per box crop plus two passes over the stuff map.
    ``host_scores``/``host_classes``: the same values as host lists when the caller has them
    (then no tensor is read before the final transfer).
    """
    pp = postprocess_cfg(cfg)
    num_stuff = _num_stuff(cfg, num_stuff_classes)
    if stuff_labels.dim() != 2:
        raise ConfigError(f"panoptic_fusion: stuff_labels must be (h,w), got {tuple(stuff_labels.shape)}")
    h, w = stuff_labels.shape
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w):
            raise ConfigError(f"panoptic_fusion: masks {tuple(masks.shape)} do not match stuff_labels ({h},{w})")
        masks = PastedMasks.from_dense(masks.to(device=stuff_labels.device), regions)
    n = len(masks)
    if tuple(masks.image_size) != (h, w) or scores.shape != (n,) or classes.shape != (n,):
        raise ConfigError(f"panoptic_fusion: masks of {n} instances at {tuple(masks.image_size)}, scores "
                          f"{tuple(scores.shape)}, classes {tuple(classes.shape)} do not match stuff_labels ({h},{w})")
    device = stuff_labels.device
    score_list = scores if host_scores is None else host_scores
    score_list = score_list.detach().float().cpu().tolist() if isinstance(score_list, torch.Tensor) else score_list
    workers = host_workers(device, h * w, HOST_SPLIT_PIXELS)
    with one_intra_op_thread(device):  # see sepsnet.postprocess.threads
        order = _visit_order(masks, score_list, pp)
        if device.type == "cpu" and READ_ON_CPU:
            id_map, visits, thing_stats, count, stuff_stats = _fuse_host(masks, order, stuff_labels, num_stuff, pp,
                                                                         workers)
        else:
            id_map = torch.zeros((h, w), dtype=torch.int32, device=device)
            visits, thing_stats, count = _fuse_things(masks, order, id_map, pp)
            stuff_stats = _fuse_stuff(stuff_labels, id_map, num_stuff, count + 1, pp) if num_stuff > 0 else None
    class_list = classes if host_classes is None else host_classes
    class_list = class_list.detach().cpu().tolist() if isinstance(class_list, torch.Tensor) else class_list
    return id_map, _segments_info(visits, thing_stats, stuff_stats, score_list, class_list)
