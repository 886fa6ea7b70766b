"""load_model_weights: shape-mismatched weights are named (strict) or dropped with a warning."""
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from sepsnet.config import load_config, parse_overrides
from sepsnet.errors import CheckpointError
from sepsnet.model import build_model
from sepsnet.model.weights import load_model_weights

ROOT = Path(__file__).parents[1]


def toy(classes: int) -> nn.Module:
    torch.manual_seed(classes)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, classes, 1))


def test_shape_mismatch_strict_names_keys_and_shapes() -> None:
    src, dst = toy(5), toy(7)
    with pytest.raises(CheckpointError, match=r"m\.pt does not fit.*2 weights differ in shape: "
                                              r"2\.weight: checkpoint \[5, 4, 1, 1\] vs model \[7, 4, 1, 1\]; "
                                              r"2\.bias: checkpoint \[5\] vs model \[7\]"):
        load_model_weights(dst, src.state_dict(), "m.pt", strict=True)


def test_shape_mismatch_non_strict_drops_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    src, dst = toy(5), toy(7)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="sepsnet.model.weights"):
        load_model_weights(dst, src.state_dict(), "m.pt", strict=False)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "2.weight" in msg and "2.bias" in msg and "[5]" in msg and "[7]" in msg
    got = dst.state_dict()
    for k, v in src.state_dict().items():
        expected = before[k] if k.startswith("2.") else v
        assert torch.equal(got[k], expected), k
    # matching weights: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sepsnet.model.weights"):
        load_model_weights(toy(5), src.state_dict(), "m.pt", strict=True)
    assert not caplog.records


def test_weights_from_another_config() -> None:
    """--weights-partial (strict=False) from a model with other class counts: the heads are dropped."""
    base = load_config(ROOT / "configs" / "tiny_synthetic.yaml")
    other = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides(
        [f"model.num_thing_classes={base.model.num_thing_classes + 2}",
         f"model.num_stuff_classes={base.model.num_stuff_classes + 1}"]))
    src, dst = build_model(other), build_model(base)
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_model_weights(dst, src.state_dict(), "other.pt", strict=True)
    load_model_weights(dst, src.state_dict(), "other.pt", strict=False)
    own = dst.state_dict()
    same = [k for k, v in src.state_dict().items() if v.shape == own[k].shape]
    assert len(same) < len(own) and all(torch.equal(own[k], src.state_dict()[k]) for k in same)


def test_train_weights_strict_names_unrelated_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """sepsnet-train --weights refuses a checkpoint whose names match nothing (even with
    --weights-partial) and one with extra keys unless --weights-partial, naming them."""
    from sepsnet.cli.train import main
    from sepsnet.data.synthetic import generate
    from sepsnet.model.weights import FORMAT

    generate(tmp_path / "syn", 2, 0, seed=1, size=64)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"format": FORMAT, "model": {"encoder.block0.weight": torch.zeros(3),
                                            "decoder.head.bias": torch.zeros(2)}}, unrelated)
    args = ["--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), "--data", str(tmp_path / "syn"),
            "--max-iter", "1", "--no-progress", "--set", "solver.batch_size=2", "data.num_workers=0",
            "data.min_size_train=[64, 64]"]
    for extra in ([], ["--weights-partial"]):
        assert main([*args, "--out", str(tmp_path / "a"), "--weights", str(unrelated), *extra]) == 2
        err = capsys.readouterr().err
        assert "matches none" in err and "decoder.head.bias" in err and "encoder.block0.weight" in err

    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml")
    state = build_model(cfg).state_dict()
    state["legacy.extra.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.pt"
    torch.save({"format": FORMAT, "model": state}, extra)
    assert main([*args, "--out", str(tmp_path / "b"), "--weights", str(extra)]) == 2
    err = capsys.readouterr().err
    assert "1 unexpected keys [legacy.extra.weight]" in err and "--weights-partial" in err
    assert main([*args, "--out", str(tmp_path / "c"), "--weights", str(extra), "--weights-partial"]) == 0
