"""Multi-process (gloo, CPU) training: a real ``torchrun`` run of sepsnet-train, and the
collectives that keep ranks in lock-step (stop flag, non-finite loss, eval barrier, loss mean).
A regression here shows up as a hang, so every launch has a hard timeout."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sepsnet.train.distributed import backend_for, check_batch_divisible

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).parent / "_ddp_worker.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(k, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU + gloo even on a GPU machine
    return env


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for all; on timeout kill each process group and fail."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"processes did not finish within {timeout} s (a rank is hung in a collective)")
    return outs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_toy(scenarios: list[str], out: Path, timeout: float = 60) -> dict[str, list[dict]]:
    env = _env()
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(WORKER), ",".join(scenarios), str(out)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in range(2)]
    outs = _wait(procs, timeout)
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-3000:]
    return {s: [json.loads((out / s / f"rank{r}.json").read_text()) for r in range(2)] for s in scenarios}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[dict]], Path]:
    """One 2-process launch running every toy scenario (process start-up dominates)."""
    out = tmp_path_factory.mktemp("ddp_toy")
    return _run_toy(["nan", "budget", "eval"], out), out


@pytest.mark.timeout(90)  # hard stop: a hung rank must fail fast, not after 600 s
def test_torchrun_two_processes_trains_tiny_synthetic(tmp_path: Path) -> None:
    from sepsnet.data.synthetic import generate

    generate(tmp_path / "syn", 4, 0, seed=0, size=64)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sepsnet.cli.train", "--config", str(ROOT / "configs" / "tiny_synthetic.yaml"),
           "--data", str(tmp_path / "syn"), "--out", str(tmp_path / "run"), "--max-iter", "2", "--no-progress",
           "--set", "solver.batch_size=2", "solver.log_period=1", "data.num_workers=0",
           "data.min_size_train=[64, 96]"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    (text,) = _wait([proc], 60)
    assert proc.returncode == 0, text[-3000:]
    assert "DDP: 2 processes, backend gloo, 1 images per process on cpu" in text
    assert (tmp_path / "run" / "model_final.pt").is_file()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2]  # rank 0 logs once per iteration


def test_nonfinite_loss_on_one_rank_stops_every_rank(toy) -> None:
    ranks = toy[0]["nan"]
    for r in ranks:  # rank 1's loss_b is NaN from its 2nd forward on; both raise at iteration 1
        assert r["iteration"] == 1
        assert r["error"] and "not finite at iteration 1" in r["error"] and "loss_b" in r["error"]
    assert "rank 1" in ranks[1]["error"]


def test_time_budget_stops_all_ranks_at_one_iteration(toy) -> None:
    ranks = toy[0]["budget"]  # rank 1 is out of time at once, rank 0 is not
    assert [r["iteration"] for r in ranks] == [0, 0]
    assert all(r["error"] is None and r["final_exists"] for r in ranks)


def test_eval_barrier_and_logged_loss_is_mean_over_ranks(toy) -> None:
    r0, r1 = toy[0]["eval"]
    assert r0["iteration"] == r1["iteration"] == 3 and not r0["error"] and not r1["error"]
    assert len(r0["eval_end"]) == 3 and not r1["eval_end"]  # rank 0 evaluates, rank 1 does not
    # rank 1 starts iteration k+1 only after rank 0's evaluation at k ended
    for k, end in enumerate(r0["eval_end"][:2]):
        assert r1["forward_times"][k + 1] >= end - 1e-3
    assert r1["returned"] >= r0["eval_end"][-1] - 1e-3
    logged = [json.loads(x) for x in (toy[1] / "eval" / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in logged if "loss_a" in x]
    assert [x["iteration"] for x in logged if "val/score" in x] == [1, 2, 3]
    for x, a, b in zip(train, r0["local_losses"], r1["local_losses"]):
        assert a["loss_a"] != pytest.approx(b["loss_a"])  # the ranks differ (scale 1 vs 2)
        assert x["loss_a"] == pytest.approx((a["loss_a"] + b["loss_a"]) / 2, rel=1e-5)
        assert x["loss_total"] == pytest.approx((a["loss_a"] + a["loss_b"] + b["loss_a"] + b["loss_b"]) / 2,
                                                rel=1e-5)


def test_backend_and_batch_message() -> None:
    assert backend_for("cpu") == "gloo" and backend_for("cuda") == "nccl"
    assert check_batch_divisible(6, 2) is None and check_batch_divisible(6, 1) is None
    msg = check_batch_divisible(6, 4)
    assert msg and "[1, 2, 3, 6]" in msg and "--set solver.batch_size=8" in msg
