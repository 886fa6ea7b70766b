"""sepsnet-eval end to end: streaming PQ equals PQ recomputed from the written files."""
from pathlib import Path

import pytest
import torch

from sepsnet.config import load_config, parse_overrides
from sepsnet.data.loader import build_dataset
from sepsnet.data.synthetic import generate
from sepsnet.eval.evaluator import evaluate_model
from sepsnet.eval.pq import pq_compute_files
from sepsnet.model import build_model
from sepsnet.train.checkpoint import save_checkpoint

ROOT = Path(__file__).parents[1]


def _tiny_eval_setup(data: Path):
    """Tiny config on the synthetic val split at ``data``, every detection kept; random-init model."""
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides(
        [f"data.val_root={data}", "data.min_size_test=96", "postprocess.score_thresh=0.0",
         "postprocess.instance_score_thresh=0.0", "postprocess.stuff_area_limit=1"]))
    torch.manual_seed(0)
    return cfg, build_model(cfg), build_dataset(cfg, train=False)


def test_eval_streaming_matches_files(tmp_path: Path) -> None:
    generate(tmp_path / "syn", 1, 3, seed=5, size=96)
    cfg, model, ds = _tiny_eval_setup(tmp_path / "syn")
    metrics = evaluate_model(model, ds, cfg, out_dir=tmp_path / "pred", boundary_ratio=0.02)
    ref = pq_compute_files(str(tmp_path / "syn" / "annotations" / "panoptic_val.json"),
                           str(tmp_path / "pred" / "panoptic_predictions.json"),
                           str(tmp_path / "syn" / "annotations" / "panoptic_val"),
                           str(tmp_path / "pred" / "panoptic_predictions"), workers=1)
    assert metrics["PQ"] == pytest.approx(ref["All"]["pq"], abs=1e-12)
    assert metrics["PQ_st"] == pytest.approx(ref["Stuff"]["pq"], abs=1e-12)
    assert 0.0 <= metrics["PQ"] <= 1.0 and metrics["images"] == 3
    boundary = pq_compute_files(str(tmp_path / "syn" / "annotations" / "panoptic_val.json"),
                                str(tmp_path / "pred" / "panoptic_predictions.json"),
                                str(tmp_path / "syn" / "annotations" / "panoptic_val"),
                                str(tmp_path / "pred" / "panoptic_predictions"), workers=1, dilation_ratio=0.02)
    assert metrics["PQ_boundary"] == pytest.approx(boundary["All"]["pq"], abs=1e-12)
    assert metrics["PQ_boundary"] <= metrics["PQ"] + 1e-12
    assert (tmp_path / "pred" / "metrics.json").is_file()


def test_eval_cli_refuses_other_config(tmp_path: Path) -> None:
    from sepsnet.cli.evaluate import main

    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml")
    ckpt = save_checkpoint(tmp_path / "m.pt", model=build_model(cfg), cfg=cfg, iteration=0)
    assert main(["--checkpoint", str(ckpt), "--config", str(ROOT / "configs" / "coco_r101.yaml")]) == 2
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2


def test_eval_cityscapes_sample_writes_both_formats(synthetic_cityscapes: Path, tmp_path: Path) -> None:
    city = synthetic_cityscapes
    cfg = load_config(ROOT / "configs" / "edge_r18.yaml", overrides=parse_overrides(
        [f"data.val_root={city}", "data.min_size_test=128", "data.max_size_test=256", "model.fpn_channels=32"]))
    torch.manual_seed(0)
    model = build_model(cfg)
    metrics = evaluate_model(model, build_dataset(cfg, train=False), cfg, out_dir=tmp_path / "pred", with_ap=False)
    assert metrics["images"] == 1 and 0.0 <= metrics["PQ"] <= 1.0
    assert (tmp_path / "pred" / "panoptic_predictions.json").is_file()
    assert list((tmp_path / "pred").glob("cityscapes*.json"))


def test_eval_skip_bad_never_substitutes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bad image is an error naming it, or with skip_bad left out (warned, counted): every other
    prediction is scored against its own ground truth and written once."""
    import json
    import logging

    from sepsnet.errors import DataError

    generate(tmp_path / "syn", 1, 3, seed=5, size=96)
    bad = tmp_path / "syn" / "val" / "val_000001.png"
    bad.write_bytes(b"not an image")
    cfg, model, ds = _tiny_eval_setup(tmp_path / "syn")
    with pytest.raises(DataError, match="val_000001.png"):
        evaluate_model(model, ds, cfg, with_ap=False)
    with caplog.at_level(logging.WARNING, logger="sepsnet.eval.evaluator"):
        metrics = evaluate_model(model, ds, cfg, out_dir=tmp_path / "pred", with_ap=False, skip_bad=True)
    assert any("val_000001.png" in r.getMessage() for r in caplog.records)
    assert metrics["images"] == 2 and metrics["skipped"] == 1
    saved = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert saved["skipped"] == 1 and saved["skipped_files"] == [str(bad)]
    pred = json.loads((tmp_path / "pred" / "panoptic_predictions.json").read_text())
    gt_path = tmp_path / "syn" / "annotations" / "panoptic_val.json"
    gt = json.loads(gt_path.read_text())
    names = {im["id"]: im["file_name"] for im in gt["images"]}
    ids = [a["image_id"] for a in pred["annotations"]]
    assert len(ids) == len(set(ids)) == 2 and bad.name not in {names[i] for i in ids}
    # the streaming PQ is the PQ of the written predictions against their own ground truth
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in set(ids)]
    (tmp_path / "gt_kept.json").write_text(json.dumps(gt))
    ref = pq_compute_files(str(tmp_path / "gt_kept.json"), str(tmp_path / "pred" / "panoptic_predictions.json"),
                           str(tmp_path / "syn" / "annotations" / "panoptic_val"),
                           str(tmp_path / "pred" / "panoptic_predictions"), workers=1)
    assert metrics["PQ"] == pytest.approx(ref["All"]["pq"], abs=1e-12)
    bad.write_bytes(b"")  # all bad: an error, not a PQ of nothing
    for name in ("val_000000.png", "val_000002.png"):
        (tmp_path / "syn" / "val" / name).write_bytes(b"")
    with pytest.raises(DataError, match="all 3 skipped"):
        evaluate_model(model, ds, cfg, with_ap=False, skip_bad=True)


def test_eval_cli_skip_bad(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from sepsnet.cli.evaluate import main

    generate(tmp_path / "syn", 1, 2, seed=5, size=96)
    (tmp_path / "syn" / "val" / "val_000000.png").write_bytes(b"not an image")
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides(["data.min_size_test=96"]))
    ckpt = save_checkpoint(tmp_path / "m.pt", model=build_model(cfg), cfg=cfg, iteration=0)
    args = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "syn"), "--no-ap", "--device", "cpu"]
    assert main(args) == 2
    assert "val_000000.png" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["images"] == 1 and json.loads(line)["skipped"] == 1
