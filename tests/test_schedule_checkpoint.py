"""LR schedule values and atomic, validated checkpoints."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sepsnet.config import SEPSNetConfig, SolverConfig
from sepsnet.errors import CheckpointError
from sepsnet.model.weights import check_compatible, load_checkpoint
from sepsnet.train.checkpoint import latest_checkpoint, save_checkpoint
from sepsnet.train.schedule import build_optimizer, build_scheduler, lr_factor


def test_paper_schedule() -> None:
    s = SolverConfig()  # constant warm-up 1k, x0.1 at 120k/420k/500k
    assert lr_factor(0, s) == pytest.approx(1 / 3)
    assert lr_factor(999, s) == pytest.approx(1 / 3)
    assert lr_factor(1000, s) == 1.0
    assert lr_factor(119999, s) == 1.0
    assert lr_factor(120000, s) == pytest.approx(0.1)
    assert lr_factor(420000, s) == pytest.approx(0.01)
    assert lr_factor(599999, s) == pytest.approx(0.001)
    lin = SolverConfig(warmup_method="linear", warmup_iters=10, warmup_factor=0.0)
    assert lr_factor(5, lin) == pytest.approx(0.5)


def test_scheduler_drives_optimizer() -> None:
    model = torch.nn.Linear(3, 2)
    s = SolverConfig(lr=0.1, warmup_iters=2, steps=[4], warmup_factor=0.5)
    opt = build_optimizer(model, s)
    sched = build_scheduler(opt, s)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.05, 0.1, 0.1, 0.01, 0.01])
    # a Linear layer's bias keeps the normal weight decay (detectron2 default)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 1e-4), ("bias", 1e-4)]


def _group_of(opt: torch.optim.Optimizer) -> dict[int, tuple[str, float]]:
    return {id(p): (g["name"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def test_weight_decay_groups_by_module_type() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    conv, gn, bn, ln, head = (torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.BatchNorm2d(8),
                              torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model = torch.nn.Sequential(FrozenBatchNorm2d(3), conv, gn, bn, ln, head)
    frozen = torch.nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    groups = _group_of(build_optimizer(model, SolverConfig(weight_decay=1e-4)))
    assert groups[id(conv.weight)] == groups[id(head.weight)] == ("decay", 1e-4)
    assert groups[id(conv.bias)] == groups[id(head.bias)] == ("bias", 1e-4)  # default: same as weight_decay
    for norm in (gn, bn, ln):
        assert groups[id(norm.weight)] == groups[id(norm.bias)] == ("norm", 0.0)
    assert id(frozen.weight) not in groups and len(groups) == 10
    groups = _group_of(build_optimizer(model, SolverConfig(weight_decay=1e-4, weight_decay_norm=1e-5,
                                                           weight_decay_bias=0.0)))
    assert groups[id(conv.bias)] == ("bias", 0.0) and groups[id(gn.weight)] == ("norm", 1e-5)
    assert groups[id(conv.weight)] == ("decay", 1e-4)


def test_sepsnet_groupnorm_params_get_norm_decay() -> None:
    from sepsnet.config import load_config
    from sepsnet.model import build_model

    cfg = load_config(Path(__file__).parents[1] / "configs" / "tiny_synthetic.yaml")
    model = build_model(cfg)
    groups = _group_of(build_optimizer(model, cfg.solver))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        expected = "norm" if isinstance(owner, torch.nn.GroupNorm) else ("bias" if name.endswith(".bias") else "decay")
        assert groups[id(p)][0] == expected, name
    assert {g for g, _ in groups.values()} == {"decay", "norm", "bias"}


def test_save_load_roundtrip_and_pointer(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    cfg = SEPSNetConfig()
    p = save_checkpoint(tmp_path / "model_0000010.pt", model=model, cfg=cfg, iteration=10)
    assert latest_checkpoint(tmp_path) == p
    ckpt = load_checkpoint(p)
    assert ckpt["iteration"] == 10
    assert torch.equal(ckpt["model"]["weight"], model.weight.detach())
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_missing_nan(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="refusing to write .*'weight' is NaN"):  # never saved
        save_checkpoint(tmp_path / "nan.pt", model=model, cfg=SEPSNetConfig(), iteration=0)
    assert not list(tmp_path.glob("*nan*")) and not (tmp_path / "last_checkpoint").exists()
    p = tmp_path / "nan.pt"  # written by something else
    torch.save({"format": "sepsnet-checkpoint/1", "model": model.state_dict(), "iteration": 0}, p)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(p)


def test_other_config_refused(tmp_path: Path) -> None:
    p = save_checkpoint(tmp_path / "a.pt", model=torch.nn.Linear(3, 2), cfg=SEPSNetConfig(), iteration=0)
    other = SEPSNetConfig()
    other.model.num_thing_classes = 8
    with pytest.raises(CheckpointError, match="num_thing_classes"):
        check_compatible(load_checkpoint(p), other, p)
    check_compatible(load_checkpoint(p), SEPSNetConfig(), p)  # same config passes


KILLER = r"""
import os, sys, torch
from sepsnet.config import SEPSNetConfig
import sepsnet.train.checkpoint as ck
orig = os.replace
def die(*a, **k):
    os._exit(9)  # killed after the temp file is written, before the rename
os.replace = die
ck.save_checkpoint(sys.argv[1], model=torch.nn.Linear(300, 300), cfg=SEPSNetConfig(), iteration=2)
"""


def test_killed_save_leaves_previous_readable(tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    save_checkpoint(target, model=torch.nn.Linear(300, 300), cfg=SEPSNetConfig(), iteration=1)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(target)], capture_output=True)
    assert proc.returncode == 9
    assert load_checkpoint(target)["iteration"] == 1
