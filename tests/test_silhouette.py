"""Silhouette targets (Sec. III-B, Fig. 2) and the Dice score/loss (Eq. 1-2) on real samples."""
from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from sepsnet.model.silhouette import (
    dice_loss,
    dice_score,
    id_edges,
    laplacian,
    panoptic_silhouette,
    resize_ids,
    stuff_silhouette,
    things_silhouette,
)

from _samples import COCO_SAMPLE, write_synthetic_cityscapes

COCO_PNGS = sorted(str(p) for p in (COCO_SAMPLE / "panoptic").glob("*.png"))


def _neighbour_differs(ids: np.ndarray) -> np.ndarray:
    """Independent reference: some 8-neighbour (edge-replicated border) has another id."""
    pad = np.pad(ids, 1, mode="edge")
    h, w = ids.shape
    out = np.zeros(ids.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out |= pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != ids
    return out


def _coco_ids(path: str) -> np.ndarray:
    rgb = cv2.imread(path, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _real_maps() -> list[np.ndarray]:
    """The COCO sample maps and the instanceIds of the synthetic Cityscapes tree (16-bit ids)."""
    maps = [_coco_ids(p) for p in COCO_PNGS]
    with tempfile.TemporaryDirectory() as tmp:
        png = next((write_synthetic_cityscapes(Path(tmp)) / "gtFine").rglob("*_instanceIds.png"))
        maps.append(cv2.imread(str(png), cv2.IMREAD_UNCHANGED).astype(np.int64))
    return maps


def test_edges_on_real_panoptic_maps():
    maps = _real_maps()
    assert len(maps) >= 2
    for ids in maps:
        assert len(np.unique(ids)) > 3
        got = id_edges(torch.from_numpy(ids)).numpy().astype(bool)
        assert got.shape == ids.shape
        np.testing.assert_array_equal(got, _neighbour_differs(ids))
        assert 0 < got.mean() < 0.2


def test_one_segment_has_no_edge_and_binary_laplacian_agrees():
    ids = _coco_ids(COCO_PNGS[0])
    seg = ids == ids[ids.shape[0] // 2, ids.shape[1] // 2]
    one = np.full(ids.shape, int(ids[0, 0]))
    assert id_edges(torch.from_numpy(one)).sum() == 0
    # for a 0/1 indicator |Laplacian| > 0 is exactly "a neighbour differs" (Eq.-free definition)
    ind = torch.from_numpy(seg.astype(np.float32))[None, None]
    lap = (laplacian(ind).abs() > 0)[0, 0].numpy()
    np.testing.assert_array_equal(lap, _neighbour_differs(seg.astype(np.int64)))


def test_raw_id_laplacian_cancellation_is_handled():
    ids = torch.tensor([[1, 2, 3]] * 3)  # 8*2 - (3*1 + 3*3 + 2*2) = 0 at the centre
    assert laplacian(ids[None, None].float())[0, 0, 1, 1] == 0
    assert id_edges(ids)[1, 1] == 1
    assert id_edges(ids).sum() == 9
    halves = torch.zeros(6, 8, dtype=torch.int64)
    halves[:, 4:] = 7  # edges only along the split, never on the image border
    e = id_edges(halves)
    assert e[:, 3:5].all() and e.sum() == 12


def test_things_stuff_panoptic_silhouettes():
    masks = torch.zeros(2, 12, 12, dtype=torch.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, 4:9, 5:10] = 1  # overlaps 0; later wins
    th = things_silhouette(masks)
    ids = np.zeros((12, 12), np.int64)
    ids[2:6, 2:6] = 1
    ids[4:9, 5:10] = 2
    np.testing.assert_array_equal(th.numpy().astype(bool), _neighbour_differs(ids))
    stuff = torch.zeros(12, 12, dtype=torch.int64)
    stuff[:, 8:] = 1
    stuff[masks.bool().any(0)] = 2
    stuff[10:, :3] = 255
    edges, valid = stuff_silhouette(stuff)
    assert valid[11, 0] == 0 and valid[9, 3] == 0 and valid[8, 4] == 1 and valid[0, 0] == 1
    assert edges[0, 7] == 1 and edges[0, 6] == 0
    pan, pvalid = panoptic_silhouette(masks, stuff)
    assert pan[4, 4] == 1  # boundary between the two touching instances
    assert edges[4, 4] == 0  # ... which the stuff silhouette cannot see (both are "thing")
    assert pvalid[11, 0] == 0 and pvalid.mean() > 0.9
    small, _ = panoptic_silhouette(masks, stuff, (6, 6))
    assert small.shape == (6, 6)
    assert resize_ids(stuff, (6, 6)).dtype == torch.int64


def test_dice_values_and_gradients():
    g = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert torch.allclose(dice_score(g, g), torch.ones(1))
    p = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    # (2 * 1.5 + 1) / (1.25 + 2 + 1) = 4 / 4.25
    assert torch.allclose(dice_score(p, g), torch.tensor([4.0 / 4.25]))
    assert torch.allclose(dice_loss(p, g), torch.tensor(1 - 4.0 / 4.25))
    valid = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    # (2*0.5 + 1) / (0.25 + 1 + 1)
    assert torch.allclose(dice_score(p, g, valid), torch.tensor([2.0 / 2.25]))
    empty = torch.zeros(2, 5, 5, requires_grad=True)
    loss = dice_loss(empty, torch.zeros(2, 5, 5))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(empty.grad).all()
    zero = torch.zeros(0, 4, 4, requires_grad=True)
    dice_loss(zero, zero.detach()).backward()
