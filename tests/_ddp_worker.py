"""One rank of a 2-process gloo run of the Trainer on the toy model (tests/test_train_ddp.py).

``python _ddp_worker.py SCENARIO[,SCENARIO...] OUT_DIR`` with RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT set runs each scenario in turn (one process group, a fresh Trainer each) and writes
``OUT_DIR/SCENARIO/rank{R}.json`` with what this rank saw.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from sepsnet.train.trainer import Trainer, TrainingError

from _toy_train import ToyData, ToyModel, toy_collate, toy_config


def run_scenario(scenario: str, out: Path) -> None:
    rank = dist.get_rank()
    result: dict = {"rank": rank, "error": None, "eval_end": []}
    model = ToyModel(scale=float(rank + 1), nan_at=2 if scenario == "nan" and rank == 1 else None)

    def evaluate(m, it: int) -> dict:
        time.sleep(0.5)
        result["eval_end"].append(time.time())
        return {"score": float(it)}

    cfg = toy_config(max_iter=3, eval_period=1 if scenario == "eval" else 0)
    trainer = Trainer(cfg, model, ToyData(), toy_collate, out / "run", device="cpu",
                      evaluate_fn=evaluate, progress=False)
    # budget: rank 1 is out of time at once, rank 0 has plenty
    budget = (0.0 if rank == 1 else 1e6) if scenario == "budget" else None
    try:
        trainer.run(max_seconds=budget)
    except TrainingError as exc:
        result["error"] = str(exc)
    result.update(iteration=trainer.iteration, forward_times=model.forward_times, local_losses=model.local_losses,
                  final_exists=(out / "run" / "model_final.pt").is_file(), returned=time.time())
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def main(scenarios: list[str], out: Path) -> None:
    # a short timeout: a rank left waiting in a collective fails in seconds, not 30 minutes
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    for scenario in scenarios:
        (out / scenario).mkdir(parents=True, exist_ok=True)
        run_scenario(scenario, out / scenario)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1].split(","), Path(sys.argv[2]))
