"""Fault injection, training: kill -9 (SIGKILL) of a training process at random points, inside
the checkpoint save included, then resume, and compare with the uninterrupted run; resume from a
folder whose pointer or newest checkpoints are missing or broken; NaN weights never saved.

The training processes are forked from the test process (torch is already imported, so each costs
milliseconds) and run the real :class:`Trainer` on the toy model of ``_toy_train.py``. A kill point
is either a seeded random instant (the parent sends SIGKILL) or a named place inside the atomic
save, where the child SIGKILLs itself: half-way through writing the temp file, after the temp file
is complete but before the rename, after the rename but before ``last_checkpoint`` is updated.
The slow variant (the real ``sepsnet-train`` on synthetic images) is ``benchmarks/kill_resume.py``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sepsnet.model.weights import load_checkpoint
from sepsnet.train.checkpoint import STALE_TEMP, save_checkpoint
from sepsnet.train.trainer import Trainer, TrainingError

from _toy_train import ToyData, ToyModel, toy_collate, toy_config

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                                reason="forks training processes (Linux)")

MAX_ITER = 8
SOLVER = {"max_iter": MAX_ITER, "checkpoint_period": 2, "log_period": 1, "lr": 0.05}
FAULTS = ("write", "replace", "pointer", "step")


def _trainer(out: Path, model: torch.nn.Module | None = None, **solver: Any) -> Trainer:
    return Trainer(toy_config(**{**SOLVER, **solver}), model or ToyModel(), ToyData(), toy_collate, out,
                   device="cpu", progress=False)


def _train(out: Path, resume: bool = True, **solver: Any) -> Trainer:
    trainer = _trainer(out, **solver)
    trainer.resume_or_load(resume=resume)
    trainer.run()
    return trainer


def _install_fault(kind: str, k: int) -> None:
    """In the child: SIGKILL itself at the k-th (1-based) occurrence of the fault point ``kind``."""
    import sepsnet.train.trainer as trainer_mod

    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == k

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "write":  # fsync of a temp file: cut it to half, then die (a torn write)
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if hit():
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                die()
            real_fsync(fd)
        os.fsync = fsync
    elif kind == "replace":  # temp file complete, rename not done
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if hit():
                die()
            real_replace(src, dst)
        os.replace = replace
    elif kind == "pointer":  # checkpoint renamed into place, pointer not yet updated
        real_replace = os.replace

        def replace_then_die(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            if Path(dst).name.startswith("model_") and hit():
                die()
        os.replace = replace_then_die
    elif kind == "step":  # between saves, after the k-th optimizer step (its metrics line written)
        real_step = trainer_mod.Trainer.step

        def step(self: Trainer, *args: Any) -> dict[str, float]:
            out = real_step(self, *args)
            if hit():
                die()
            return out
        trainer_mod.Trainer.step = step  # type: ignore[method-assign]


def _fork_train(out: Path, fault: tuple[str, int] | None = None) -> int:
    """Fork a child that resumes/trains in ``out`` (with ``fault`` installed); return its pid."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if fault is not None:
                _install_fault(*fault)
            _train(out)
            code = 0
        except BaseException:  # noqa: B036 - report whatever ended the child, for the parent's assertion
            import traceback

            (out / ".child_error.txt").write_text(traceback.format_exc())
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 60.0) -> int:
    """Exit status: the exit code, or -signal."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("training child hung")
        time.sleep(0.005)


def _child_error(out: Path) -> str:
    err = out / ".child_error.txt"
    return err.read_text() if err.is_file() else "(no traceback written)"


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _require_forkable_autograd() -> None:
    """Skip (with the reason) when this process already started autograd's worker threads: a forked
    child can then never run backward. `make test` runs this file in a process of its own."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.ones(2, requires_grad=True).sum().backward()
            code = 0
        finally:
            os._exit(code)
    if _wait(pid) != 0:
        pytest.skip("autograd threads were started in this test process before the fork (run this file in its "
                    "own process, as `make test` does: pytest tests/test_faults_kill.py)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """The uninterrupted run: metrics per iteration and the final weights."""
    import torch.utils.tensorboard  # noqa: F401  (imported once here, not in every child)

    _require_forkable_autograd()
    out = tmp_path_factory.mktemp("reference")
    pid = _fork_train(out)
    assert _wait(pid) == 0, _child_error(out)
    return _metrics(out), load_checkpoint(out / "model_final.pt")["model"]


def _assert_same_run(out: Path, reference: tuple[list[dict[str, Any]], dict[str, torch.Tensor]]) -> None:
    rows, weights = reference
    got = _metrics(out)
    assert [r["iteration"] for r in got] == list(range(1, MAX_ITER + 1))  # each iteration once, in order
    for a, b in zip(rows, got):
        assert b["loss_total"] == pytest.approx(a["loss_total"], rel=1e-5, abs=1e-7), (a, b)
        assert b["lr"] == pytest.approx(a["lr"])
    final = load_checkpoint(out / "model_final.pt")
    assert final["iteration"] == MAX_ITER
    for name, w in weights.items():
        torch.testing.assert_close(final["model"][name], w, rtol=1e-5, atol=1e-7)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no stale temp file left


SEEDS = int(os.environ.get("SEPSNET_FAULT_SEEDS", "4"))  # more for a longer soak: SEPSNET_FAULT_SEEDS=200


@pytest.mark.parametrize("seed", range(SEEDS))
def test_kill_at_random_points_then_resume_matches_uninterrupted(tmp_path: Path, reference, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(3):  # up to three kills in a row, each at a random point, then a clean finish
        if rng.random() < 0.25:  # an external kill -9 at a random instant
            pid = _fork_train(tmp_path)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            status = _wait(pid)
        else:
            fault = (rng.choice(FAULTS), rng.randint(1, 4))
            status = _wait(_fork_train(tmp_path, fault))
        assert status in (0, -signal.SIGKILL), status
        if status == 0:
            break
    assert _wait(_fork_train(tmp_path)) == 0, _child_error(tmp_path)
    _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("fault", [("write", 1), ("replace", 1), ("pointer", 1), ("write", 3), ("replace", 4)])
def test_kill_inside_save_then_resume(tmp_path: Path, reference, fault: tuple[str, int]) -> None:
    """Each place inside the save, deterministically; the torn temp file is removed on the restart."""
    assert _wait(_fork_train(tmp_path, fault)) == -signal.SIGKILL
    if fault[0] in ("write", "replace"):
        assert [p for p in tmp_path.iterdir() if STALE_TEMP.match(p.name)], "the kill left no temp file"
    assert _wait(_fork_train(tmp_path)) == 0, _child_error(tmp_path)
    _assert_same_run(tmp_path, reference)


# -- resume from damaged folders (in process) -------------------------------------------------------
def _run_to(out: Path, iters: int) -> None:
    _train(out, resume=True, max_iter=iters)


def test_resume_without_pointer_or_with_a_dangling_one(tmp_path: Path) -> None:
    _run_to(tmp_path, 4)  # model_0000002.pt, model_0000004.pt, model_final.pt (4)
    (tmp_path / "last_checkpoint").unlink()
    t = _trainer(tmp_path)
    t.resume_or_load(resume=True)
    assert t.iteration == 4
    (tmp_path / "last_checkpoint").write_text("model_0000099.pt")  # names a deleted file
    t = _trainer(tmp_path)
    t.resume_or_load(resume=True)
    assert t.iteration == 4
    (tmp_path / "last_checkpoint").write_bytes(b"\xff\xfe../../etc/passwd\x00")  # garbage pointer
    t = _trainer(tmp_path)
    t.resume_or_load(resume=True)
    assert t.iteration == 4


def test_resume_skips_a_stale_pointer_and_broken_newest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_to(tmp_path, 6)
    (tmp_path / "last_checkpoint").write_text("model_0000002.pt")  # stale: a newer checkpoint exists
    t = _trainer(tmp_path)
    t.resume_or_load(resume=True)
    assert t.iteration == 6
    for name in ("model_final.pt", "model_0000006.pt"):  # the newest ones are torn
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 3])
    metrics_before = len(_metrics(tmp_path))
    t = _trainer(tmp_path)
    t.resume_or_load(resume=True)
    assert t.iteration == 4 and t.last_checkpoint == tmp_path / "model_0000004.pt"
    out = capsys.readouterr().out
    assert "not resuming from model_final.pt" in out and "not resuming from model_0000006.pt" in out
    assert [r["iteration"] for r in _metrics(tmp_path)] == [1, 2, 3, 4] and metrics_before == 6


def test_resume_refuses_when_no_checkpoint_loads_and_changes_nothing(tmp_path: Path) -> None:
    _run_to(tmp_path, 4)
    (tmp_path / ".model_0000006.pt.abcd1234.tmp").write_bytes(b"torn")
    for p in tmp_path.glob("model_*.pt"):
        p.write_bytes(p.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.name.endswith(".tmp")}
    with pytest.raises(TrainingError, match=r"none of the 3 checkpoint\(s\).*can be loaded.*nothing was changed"):
        _trainer(tmp_path).resume_or_load(resume=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # metrics.jsonl, checkpoints, pointer untouched (only the stale temp file went)


def test_fresh_start_refuses_a_folder_with_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _run_to(tmp_path, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(TrainingError, match="already holds checkpoints.*--resume"):
        _trainer(tmp_path).resume_or_load(resume=False)
    from sepsnet.cli.train import main

    rc = main(["--config", str(Path(__file__).parents[1] / "configs" / "tiny_synthetic.yaml"), "--out",
               str(tmp_path), "--no-progress"])
    assert rc == 2 and "already holds checkpoints" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_resume_with_a_binary_torn_metrics_log(tmp_path: Path) -> None:
    _run_to(tmp_path, 2)
    with open(tmp_path / "metrics.jsonl", "ab") as f:  # a kill mid-append left bytes that are not UTF-8
        f.write(b'{"iteration": 3, "loss_\xff\xfe\x00')
    t = _trainer(tmp_path, max_iter=4)
    t.resume_or_load(resume=True)
    t.run()
    assert [r["iteration"] for r in _metrics(tmp_path)] == [1, 2, 3, 4]


def test_restart_from_zero_keeps_old_metrics(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss_total": 5.0}\n')  # killed before any save
    _run_to(tmp_path, 2)
    assert (tmp_path / "metrics.old-1.jsonl").read_text() == '{"iteration": 1, "loss_total": 5.0}\n'
    assert [r["iteration"] for r in _metrics(tmp_path)] == [1, 2]


def test_only_own_stale_temp_files_are_removed(tmp_path: Path) -> None:
    own = [".model_0000004.pt.k3j_9x0a.tmp", ".model_final.pt.abcdefgh.tmp", ".last_checkpoint.12345678.tmp",
           ".metrics.jsonl.zz__zz__.tmp"]
    foreign = [".model_0000004.pt.short.tmp", "model_0000004.pt.abcdefgh.tmp", ".notes.txt.abcdefgh.tmp",
               ".model_0000004.pt.abcdefgh.tmp.bak", "user.tmp", ".model_x.pth.abcdefgh.tmp"]
    for name in own + foreign:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / own[0]).write_bytes(b"x")  # only the output folder itself is cleaned
    (tmp_path / ".model_0000008.pt.linklink.tmp").symlink_to(tmp_path / "user.tmp")
    _trainer(tmp_path).resume_or_load(resume=True)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not set(own) & set(left)
    assert set(foreign) <= set(left) and (tmp_path / "sub" / own[0]).exists()
    assert ".model_0000008.pt.linklink.tmp" in left  # a link is not ours to follow or remove


class PoisonedModel(ToyModel):
    """Its weights turn NaN during the ``poison_at``-th forward, after the (finite) loss is computed:
    the loss check cannot see it, only the check before saving can."""

    def __init__(self, poison_at: int) -> None:
        super().__init__()
        self.poison_at = poison_at

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        losses = super().forward(images, targets)
        if self.calls == self.poison_at:
            with torch.no_grad():
                self.lin.bias.fill_(float("nan"))
        return losses


def test_nan_weights_are_never_saved_over_a_good_checkpoint(tmp_path: Path) -> None:
    _run_to(tmp_path, 2)
    good = (tmp_path / "model_final.pt").read_bytes()
    pointer = (tmp_path / "last_checkpoint").read_text()
    t = _trainer(tmp_path, PoisonedModel(poison_at=1), max_iter=4, checkpoint_period=1)
    t.resume_or_load(resume=True)
    with pytest.raises(TrainingError, match=r"not finite at iteration 3 \('lin.bias'.*not saving model_0000003.pt"
                                            r".*last good checkpoint is .*model_final.pt"):
        t.run()
    assert (tmp_path / "model_final.pt").read_bytes() == good and not (tmp_path / "model_0000003.pt").exists()
    assert (tmp_path / "last_checkpoint").read_text() == pointer


def test_nan_weights_at_the_end_leave_no_model_final(tmp_path: Path) -> None:
    """The reported case: one iteration, weights NaN, exit 0 with a NaN model_final.pt. Now an error."""
    t = _trainer(tmp_path, PoisonedModel(poison_at=1), max_iter=1, checkpoint_period=0)
    t.resume_or_load(resume=False)
    with pytest.raises(TrainingError, match="not saving model_final.pt"):
        t.run()
    assert not list(tmp_path.glob("*.pt")) and not (tmp_path / "last_checkpoint").exists()


def test_save_checkpoint_refuses_nonfinite_buffers(tmp_path: Path) -> None:
    from sepsnet.config import SEPSNetConfig
    from sepsnet.errors import CheckpointError

    model = torch.nn.BatchNorm1d(3)
    model.running_var[1] = float("inf")
    with pytest.raises(CheckpointError, match="running_var"):
        save_checkpoint(tmp_path / "m.pt", model=model, cfg=SEPSNetConfig(), iteration=1)
    assert list(tmp_path.iterdir()) == []
