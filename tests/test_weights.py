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
    """--weights (strict=False) from a model with other class counts: the heads are dropped."""
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
