"""Data loaders on real samples, the synthetic generator, and training resume exactness."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import DataConfig
from sepsnet.data.coco_panoptic import CocoPanopticDataset, read_panoptic_png
from sepsnet.data.synthetic import generate
from sepsnet.data.transforms import collate
from sepsnet.errors import DataError

from _samples import COCO_SAMPLE

SAMPLE = COCO_SAMPLE
ROOT = Path(__file__).parents[1]


def sample_dataset(train: bool = False) -> CocoPanopticDataset:
    cfg = DataConfig(min_size_test=0)  # keep the original size
    return CocoPanopticDataset(SAMPLE / "panoptic_examples.json", SAMPLE / "panoptic", SAMPLE / "images", cfg,
                               train=train, categories_path=SAMPLE / "panoptic_coco_categories.json")


def test_coco_sample_targets_match_json() -> None:
    ds = sample_dataset()
    doc = json.loads((SAMPLE / "panoptic_examples.json").read_text())
    cats = {c["id"]: c for c in json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())}
    assert len(ds) == len(doc["annotations"]) == 2
    for i, ann in enumerate(doc["annotations"]):
        item = ds[i]
        t = item["targets"]
        ids = read_panoptic_png(SAMPLE / "panoptic" / ann["file_name"])
        things = [s for s in ann["segments_info"] if cats[s["category_id"]]["isthing"] and not s["iscrowd"]]
        assert t["boxes"].shape[0] == len(things)
        thing_order = [cats[c]["id"] for c in sorted(cats) if cats[c]["isthing"]]
        for k, seg in enumerate(things):
            assert int(t["masks"][k].sum()) == seg["area"] == int((ids == seg["id"]).sum())
            x, y, w, h = seg["bbox"]
            assert t["boxes"][k].tolist() == [x, y, x + w, y + h]
            assert int(t["classes"][k]) == thing_order.index(seg["category_id"])
        void = ids == 0
        assert (t["stuff"][torch.from_numpy(void)] == 255).all()
        assert item["image"].shape[1:] == ids.shape


def test_synthetic_deterministic_and_loadable(tmp_path: Path) -> None:
    generate(tmp_path / "a", 4, 2, seed=3, size=96)
    generate(tmp_path / "b", 4, 2, seed=3, size=96)
    for f in sorted((tmp_path / "a").rglob("*.*")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    ds = CocoPanopticDataset.from_root(tmp_path / "a", "train", DataConfig(min_size_train=[96, 96]), train=True)
    assert len(ds) == 4 and len(ds.meta.things) == 3 and len(ds.meta.stuff) == 3
    images, targets, infos = collate([ds[0], ds[1]], 32)
    assert images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    for t, info in zip(targets, infos):
        h, w = info["resized_size"]
        assert t["masks"].shape[1:] == images.shape[2:]
        assert (t["stuff"][h:, :] == 255).all() and (t["stuff"][:, w:] == 255).all()


def test_clear_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        CocoPanopticDataset.from_root(tmp_path / "missing", "train", DataConfig(), train=True)
    generate(tmp_path / "d", 2, 0, seed=0, size=64)
    (tmp_path / "d" / "annotations" / "panoptic_train.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        CocoPanopticDataset.from_root(tmp_path / "d", "train", DataConfig(), train=True)
    generate(tmp_path / "e", 2, 0, seed=0, size=64)
    (tmp_path / "e" / "train" / "train_000000.png").write_bytes(b"garbage bytes")
    ds = CocoPanopticDataset.from_root(tmp_path / "e", "train", DataConfig(), train=False)
    with pytest.raises(DataError, match="train_000000.png"):
        ds[0]
    ds.skip_bad = True
    assert ds[0]["info"]["file_name"] == "train_000001.png"


def _train(out: Path, data: Path, iters: int, resume: bool, extra: tuple[str, ...] = ()) -> list[dict]:
    from sepsnet.cli.train import main

    rc = main(["--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), "--data", str(data), "--out", str(out),
               "--max-iter", str(iters), "--no-progress", "--set", "solver.batch_size=2", "solver.log_period=1",
               "data.num_workers=0", "data.min_size_train=[64, 96]", "solver.checkpoint_period=2", *extra]
              + (["--resume"] if resume else []))
    assert rc == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_loss_curve(tmp_path: Path) -> None:
    generate(tmp_path / "syn", 6, 0, seed=1, size=64)
    straight = _train(tmp_path / "a", tmp_path / "syn", 4, False)
    _train(tmp_path / "b", tmp_path / "syn", 2, False)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a crash after the checkpoint left iteration 3
        f.write(json.dumps({"iteration": 3, "loss_total": 1e6}) + "\n")
    resumed = _train(tmp_path / "b", tmp_path / "syn", 4, True)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]  # the stale line is gone
    for a, b in zip(straight[2:], resumed[2:]):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-6, abs=1e-7)
    assert all(np.isfinite(r["loss_total"]) for r in straight)


def test_tensorboard_scalars_match_metrics_log(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    generate(tmp_path / "syn", 4, 0, seed=2, size=64)
    logged = _train(tmp_path / "run", tmp_path / "syn", 2, False)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss_total" in tags and "lr" in tags
    steps = {e.step: e.value for e in events.Scalars("loss_total")}
    assert steps == {r["iteration"]: pytest.approx(r["loss_total"], rel=1e-6) for r in logged}


def test_cli_periodic_eval_writes_val_metrics(tmp_path: Path) -> None:
    generate(tmp_path / "syn", 2, 1, seed=4, size=64)
    rows = _train(tmp_path / "run", tmp_path / "syn", 2, False,
                  ("solver.eval_period=2", "data.min_size_test=64", "data.max_size_test=96"))
    val = [r for r in rows if "val/PQ" in r]
    assert [r["iteration"] for r in val] == [2]
    assert (tmp_path / "run" / "eval_0000002" / "metrics.json").is_file()


def test_train_refuses_checkpoint_of_other_config(tmp_path: Path) -> None:
    from sepsnet.cli.train import main

    generate(tmp_path / "syn", 2, 0, seed=1, size=64)
    _train(tmp_path / "run", tmp_path / "syn", 1, False)
    rc = main(["--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), "--data", str(tmp_path / "syn"),
               "--out", str(tmp_path / "run"), "--resume", "--no-progress", "--max-iter", "2",
               "--set", "model.fpn_channels=32", "data.num_workers=0"])
    assert rc == 2


def test_cityscapes_sample_matches_instance_ids(cityscapes_root: Path) -> None:
    import cv2
    from cityscapesscripts.helpers.labels import id2label

    from sepsnet.data.cityscapes import CityscapesDataset

    ds = CityscapesDataset(cityscapes_root, "val", DataConfig(min_size_test=0), train=False)
    assert len(ds) == 1 and len(ds.meta.things) == 8 and len(ds.meta.stuff) == 11
    raw = cv2.imread(str(next((cityscapes_root / "gtFine" / "val").rglob("*instanceIds.png"))), cv2.IMREAD_UNCHANGED)
    expected = {}
    for v in np.unique(raw):
        lab = id2label[v // 1000 if v >= 1000 else v]
        if v >= 1000 and lab.hasInstances and not lab.ignoreInEval:
            expected[int(v)] = int((raw == v).sum())
    item = ds[0]
    t = item["targets"]
    assert t["boxes"].shape[0] == len(expected) > 0
    assert sorted(int(m.sum()) for m in t["masks"]) == sorted(expected.values())
    thing_names = [th["name"] for th in ds.meta.things]
    got = sorted(thing_names[int(c)] for c in t["classes"])
    assert got == sorted(id2label[v // 1000].name for v in expected)
    gt_ids, segs = ds.load_gt(0)
    assert all(int((gt_ids == s["id"]).sum()) == s["area"] for s in segs)
