"""PQ building blocks: run-length overlap counts equal a brute-force count, PNG ids come back as
uint32, and the PQ command line does not import torch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_pq import make_gt, perturb

from sepsnet.eval.boundary import boundary_band
from sepsnet.eval.panoptic_png import read_id_png, rgb_to_id
from sepsnet.eval.segment_overlap import segment_overlaps

ROOT = Path(__file__).resolve().parents[1]


def brute_force(gt: np.ndarray, pred: np.ndarray, code: np.ndarray | None = None) -> dict:
    """{(gt id, pred id[, band code]): pixels} by np.unique over every pixel."""
    cols = [gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)]
    if code is not None:
        cols.append(code.ravel().astype(np.int64))
    keys, counts = np.unique(np.stack(cols, 1), axis=0, return_counts=True)
    return {tuple(k): int(c) for k, c in zip(keys.tolist(), counts.tolist())}


@pytest.mark.parametrize("offset,dtype", [(0, np.uint32), (-(1 << 20), np.int32), (0, np.int64),
                                          (1 << 40, np.int64), (-(1 << 33), np.int64)])
def test_overlaps_equal_brute_force(offset: int, dtype: type, pq_path: str) -> None:
    rng = np.random.default_rng(11)
    cats, things = [1, 2, 3, 10, 11, 12], [1, 2, 3]
    for _ in range(15):
        gt, gsegs = make_gt(rng, 37, 53)  # odd sizes: runs wrap from one row into the next
        pred, _ = perturb(rng, gt, gsegs, cats, things)
        gt, pred = (gt + offset).astype(dtype), (pred + offset).astype(dtype)
        ov = segment_overlaps(gt, pred)
        got = {(g, p): c for g, p, c in zip(ov.gt.tolist(), ov.pred.tolist(), ov.pixels.tolist())}
        assert got == brute_force(gt, pred)
        gb, pb = boundary_band(gt, 3), boundary_band(pred, 2)
        ov = segment_overlaps(gt, pred, gb, pb)
        code = gb.astype(np.int64) | (pb.astype(np.int64) << 1)
        want = brute_force(gt, pred, code)
        got = {(g, p, k): c for g, p, row in zip(ov.gt.tolist(), ov.pred.tolist(), ov.band.tolist())
               for k, c in enumerate(row) if c}
        assert got == want
        assert ov.pixels.tolist() == ov.band.sum(1).tolist()


def test_overlaps_of_tiny_maps(pq_path: str) -> None:
    one = np.array([[7]], np.uint32)
    ov = segment_overlaps(one, one)
    assert (ov.gt.tolist(), ov.pred.tolist(), ov.pixels.tolist()) == ([7], [7], [1])
    empty = np.zeros((0, 4), np.uint32)
    assert segment_overlaps(empty, empty).pixels.size == 0
    assert boundary_band(np.arange(5).reshape(1, 5), 1).all()  # every pixel touches the border


def test_png_ids_are_uint32(tmp_path) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1 << 24, (9, 13), dtype=np.int64)
    bgr = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], -1).astype(np.uint8)
    for name, img in (("rgb.png", bgr), ("rgba.png", np.dstack([bgr, rng.integers(0, 256, (9, 13), np.uint8)]))):
        cv2.imwrite(str(tmp_path / name), img)
        got = read_id_png(str(tmp_path / name))
        assert got.dtype == np.uint32
        np.testing.assert_array_equal(got, ids)
        np.testing.assert_array_equal(got, rgb_to_id(img[..., 2::-1]))


def test_pq_command_does_not_import_torch() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    code = ("import sys, sepsnet.cli.pq, sepsnet.eval.pq; from sepsnet.eval import pq_native; "
            "heavy = ('torch', 'torchvision', 'scipy') + (('cv2',) if pq_native.NATIVE else ()); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
