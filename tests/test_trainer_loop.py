"""Trainer loop details on a toy model (single process): gradient clipping, non-finite loss,
periodic evaluation, time_per_iter, progress postfix, metrics.jsonl trimming on resume and
the TensorBoard purge step."""
import json
import types
from pathlib import Path

import pytest
import torch

from sepsnet.train.metrics_log import MetricsLog, trim_metrics
from sepsnet.train.trainer import Trainer, TrainingError, _postfix

from _toy_train import ToyData, ToyModel, toy_collate, toy_config


def _trainer(tmp_path: Path, model: ToyModel, evaluate_fn=None, **solver) -> Trainer:
    return Trainer(toy_config(**solver), model, ToyData(), toy_collate, tmp_path / "run", device="cpu",
                   evaluate_fn=evaluate_fn, progress=False)


def _grad_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


@pytest.mark.parametrize("clip", [None, 0.5])
def test_gradient_clipping_bounds_grad_norm(tmp_path: Path, clip) -> None:
    model = ToyModel(scale=1000.0)  # huge gradients
    trainer = _trainer(tmp_path, model, clip_grad_norm=clip)
    images, targets = toy_collate([ToyData()[i] for i in range(2)])
    trainer.step(trainer.model, images, targets)
    norm = _grad_norm(model)  # gradients stay on the parameters after the step
    if clip is None:
        assert norm > 100.0
    else:
        assert norm == pytest.approx(clip, rel=1e-4)


def test_nonfinite_loss_names_the_loss(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, ToyModel(nan_at=2))
    with pytest.raises(TrainingError, match=r"not finite at iteration 1: \{'loss_b': nan, 'loss_total': nan\}"):
        trainer.run()
    assert trainer.iteration == 1


def test_periodic_eval_logs_val_metrics(tmp_path: Path) -> None:
    seen = []

    def evaluate(model: torch.nn.Module, iteration: int) -> dict:
        seen.append((iteration, model.training))
        return {"PQ": 10.0 * iteration, "note": "text is skipped", "bad": float("nan")}

    trainer = _trainer(tmp_path, ToyModel(), evaluate_fn=evaluate, eval_period=2, max_iter=5)
    trainer.run()
    assert [it for it, _ in seen] == [2, 4]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    assert val == [{"iteration": 2, "val/PQ": 20.0}, {"iteration": 4, "val/PQ": 40.0}]


def test_time_per_iter_divides_by_iterations_since_last_log(tmp_path: Path, monkeypatch) -> None:
    import sepsnet.train.trainer as trainer_mod

    clock = {"t": 0.0}
    model = ToyModel()
    forward = model.forward

    def timed_forward(*args):  # every iteration takes exactly 1 s of (fake) wall time
        clock["t"] += 1.0
        return forward(*args)

    model.forward = timed_forward  # type: ignore[method-assign]
    monkeypatch.setattr(trainer_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    _trainer(tmp_path, model, log_period=3, max_iter=4).run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["time_per_iter"]) for r in rows] == [(3, 1.0), (4, 1.0)]


def test_postfix_shows_every_loss() -> None:
    text = _postfix({"loss_fcos_cls": 0.87654, "loss_mask_iou": 0.5, "loss_total": 1.37654, "lr": 0.01,
                     "time_per_iter": 2.0})
    assert text == "total=1.38 fcos_cls=0.877 mask_iou=0.5 lr=1.00e-02"


def test_trim_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert trim_metrics(path, 3) == 0 and not path.exists()
    rows = [{"iteration": i, "loss_total": float(i)} for i in (1, 2, 3, 4, 5)] + [{"iteration": 3, "val/PQ": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 6, "loss_to')  # torn last write
    assert trim_metrics(path, 3) == 3
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3] + rows[5:]
    assert trim_metrics(path, 3) == 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_trims_metrics_and_purges_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, ToyModel(), max_iter=2).run()
    out = tmp_path / "run"
    with open(out / "metrics.jsonl", "a") as f:  # a crashed run got to iteration 3 after the checkpoint
        f.write(json.dumps({"iteration": 3, "loss_total": 1e6}) + "\n")
    log = MetricsLog(out, True)
    log.write(3, {"loss_total": 1e6})
    log.close()
    resumed = _trainer(tmp_path, ToyModel(), max_iter=4)
    resumed.resume_or_load(resume=True)
    assert resumed.iteration == 2
    assert [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed.run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4] and rows[2]["loss_total"] < 1e6
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    steps = {e.step: e.value for e in events.Scalars("loss_total")}
    assert sorted(steps) == [1, 2, 3, 4] and steps[3] == pytest.approx(rows[2]["loss_total"], rel=1e-6)
