"""Synthetic generator: deterministic by seed, JSON consistent with the PNGs, occluded and thin
things present, readable by the COCO loader, and the sepsnet-synth CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sepsnet.cli.synth import main as synth_main
from sepsnet.config import DataConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.synthetic import generate
from sepsnet.errors import DataError


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("syn")
    generate(root, 16, 3, seed=11, size=96)
    return root


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(syn: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", 16, 3, seed=11, size=96)
    a, b = files(syn), files(tmp_path / "again")
    assert len(a) == 2 * (16 + 3) + 2 and a == b
    generate(tmp_path / "other", 16, 3, seed=12, size=96)
    c = files(tmp_path / "other")
    assert c.keys() == a.keys() and c["annotations/panoptic_train.json"] != a["annotations/panoptic_train.json"]
    assert not list(syn.rglob("*.tmp"))


def test_json_matches_pngs(syn: Path) -> None:
    occluded_pairs = thin = 0
    for split, n in (("train", 16), ("val", 3)):
        doc = json.loads((syn / "annotations" / f"panoptic_{split}.json").read_text())
        cats = {c["id"]: c for c in doc["categories"]}
        assert sum(c["isthing"] for c in cats.values()) == 3 and len(cats) == 6
        assert len(doc["images"]) == len(doc["annotations"]) == n
        images = {im["id"]: im for im in doc["images"]}
        for ann in doc["annotations"]:
            im = images[ann["image_id"]]
            photo = np.asarray(Image.open(syn / split / im["file_name"]))
            rgb = np.asarray(Image.open(syn / "annotations" / f"panoptic_{split}" / ann["file_name"])).astype(np.int64)
            ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
            assert photo.shape == (im["height"], im["width"], 3) == (*ids.shape, 3)
            assert im["height"] == 96 and im["width"] in (96, 120)
            segs = ann["segments_info"]
            assert set(np.unique(ids)) - {0} == {s["id"] for s in segs}
            assert any(not cats[s["category_id"]]["isthing"] for s in segs)
            boxes = []
            for s in segs:
                m = ids == s["id"]
                ys, xs = np.nonzero(m)
                assert s["area"] == int(m.sum()) and s["iscrowd"] == 0
                assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                if cats[s["category_id"]]["isthing"]:
                    x, y, w, h = s["bbox"]
                    boxes.append((x, y, x + w, y + h))
                    thin += s["area"] < 0.45 * w * h  # "L" shapes: thin bars
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    a, b = boxes[i], boxes[j]
                    occluded_pairs += a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    assert occluded_pairs >= 3 and thin >= 3


def test_loads_through_coco_loader(syn: Path) -> None:
    ds = CocoPanopticDataset.from_root(syn, "train", DataConfig(min_size_test=0), train=False)
    doc = json.loads((syn / "annotations" / "panoptic_train.json").read_text())
    assert len(ds) == 16 and ds.meta.thing_names == ["disc", "box", "ell"]
    assert ds.meta.stuff_names == ["sky", "ground", "wall"]
    for i in (0, 7):
        t = ds[i]["targets"]
        things = [s for s in doc["annotations"][i]["segments_info"] if s["category_id"] in (1, 2, 3)]
        assert t["boxes"].shape[0] == len(things)
        assert sorted(int(m.sum()) for m in t["masks"]) == sorted(s["area"] for s in things)
        assert set(t["stuff"].unique().tolist()) <= {0, 1, 2, 3, 255}
    val = CocoPanopticDataset.from_root(syn, "val", DataConfig(), train=False)
    assert len(val) == 3


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert synth_main(["--out", str(out), "--n", "3", "--val-n", "1", "--size", "64", "--seed", "4"]) == 0
    assert "wrote 3 train + 1 val" in capsys.readouterr().out
    for p in ("annotations/panoptic_train.json", "annotations/panoptic_val.json", "train/train_000002.png",
              "val/val_000000.png", "annotations/panoptic_val/val_000000.png"):
        assert (out / p).is_file(), p
    assert synth_main(["--out", str(out), "--n", "0"]) == 2
    assert synth_main(["--out", str(out), "--n", "2", "--size", "8"]) == 2
    assert "size >= 32" in capsys.readouterr().err
    with pytest.raises(DataError):
        generate(out / "annotations" / "panoptic_val.json", 1, 0)
