"""Slow fault-injection soak (not part of ``make test``): the real ``sepsnet-train`` CLI on a small
synthetic dataset is killed with SIGKILL at random instants, resumed with ``--resume`` after each
kill, and its metrics and final weights are compared with an uninterrupted run. Prints JSON.

    python benchmarks/kill_resume.py [--iters 8] [--kills 3] [--seed 0] [--workdir DIR]

The fast, deterministic counterpart (kills inside the save, toy model) is tests/test_faults_kill.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"


def train_cmd(data: Path, out: Path, iters: int) -> list[str]:
    return [sys.executable, "-m", "sepsnet.cli.train", "--config", str(CONFIG), "--data", str(data),
            "--out", str(out), "--max-iter", str(iters), "--resume", "--no-progress",
            "--set", "solver.batch_size=2", "solver.log_period=1", "solver.checkpoint_period=1",
            "data.num_workers=0", "data.min_size_train=[64, 96]"]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"training failed ({proc.returncode}): {err.decode()[-2000:]}")
    return proc.returncode, time.perf_counter() - t0


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    import torch

    from sepsnet.data.synthetic import generate
    from sepsnet.model.weights import load_checkpoint

    rng = random.Random(a.seed)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    data = work / "syn"
    if not data.exists():
        generate(data, 6, 0, seed=1, size=64)
    straight, killed = work / "straight", work / "killed"
    _, full_time = run(train_cmd(data, straight, a.iters))
    statuses = []
    for _ in range(a.kills):
        status, _ = run(train_cmd(data, killed, a.iters), kill_after=rng.uniform(0.2, 1.0) * full_time)
        statuses.append(status)
        if status == 0:
            break
    if statuses[-1] != 0:
        run(train_cmd(data, killed, a.iters))
    ref, got = metrics(straight), metrics(killed)
    rel = max(abs(x["loss_total"] - y["loss_total"]) / max(abs(x["loss_total"]), 1e-12) for x, y in zip(ref, got))
    wa, wb = load_checkpoint(straight / "model_final.pt")["model"], load_checkpoint(killed / "model_final.pt")["model"]
    wdiff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())
    print(json.dumps({
        "iters": a.iters, "seed": a.seed, "kills_requested": a.kills,
        "killed_runs": sum(s == -signal.SIGKILL for s in statuses), "uninterrupted_seconds": round(full_time, 1),
        "same_iterations": [r["iteration"] for r in got] == [r["iteration"] for r in ref]
        == list(range(1, a.iters + 1)),
        "max_rel_loss_diff": rel, "max_abs_weight_diff": wdiff,
        "stale_temp_files": sorted(q.name for q in killed.iterdir() if q.name.endswith(".tmp")),
        "torch": torch.__version__, "workdir": str(work),
    }, indent=2))


if __name__ == "__main__":
    main()
