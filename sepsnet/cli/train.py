"""``sepsnet-train --config X [--out DIR] [--resume] [--data DIR] [--set k=v ...]``.

Multi-GPU / multi-node (DDP; nccl on CUDA, gloo on CPU): ``torchrun --nproc_per_node 2 -m
sepsnet.cli.train --config X``. ``solver.batch_size`` is the global batch and must divide by the
number of processes: batch 6 (the paper's) runs on 1, 2, 3 or 6 processes; for 8 GPUs pass
``--set solver.batch_size=8`` (or 16, ...).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sepsnet.cli._common import positive_float, positive_int, preflight, run_cli


def _main(argv: Sequence[str] | None) -> int:
    p = argparse.ArgumentParser(prog="sepsnet-train", description="Train SE-PSNet.")
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("--out", default="runs/train", help="output folder (checkpoints, metrics.jsonl, tb/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last_checkpoint")
    p.add_argument("--weights", default=None,
                   help="initialise the model from this sepsnet checkpoint (every weight must match; "
                        "detectron2/AdelaiDet models: convert with sepsnet-convert first)")
    p.add_argument("--weights-partial", action="store_true",
                   help="with --weights: load only the weights whose name and shape match, listing the rest")
    p.add_argument("--data", default=None, help="dataset root (overrides data.train_root/val_root)")
    p.add_argument("--max-iter", type=positive_int, default=None, help="override solver.max_iter")
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop (and save) after this wall time")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    preflight(device=a.device, out_dirs={"--out": a.out})  # before the config, data and model are loaded
    from sepsnet.train.trainer import check_fresh_start

    check_fresh_start(a.out, a.resume)  # never train over an earlier run's checkpoints

    import torch

    from sepsnet.config import load_config, parse_overrides
    from sepsnet.data.loader import build_dataset
    from sepsnet.data.transforms import Collate
    from sepsnet.errors import ConfigError
    from sepsnet.model import build_model
    from sepsnet.model.pretrained import apply_input_convention
    from sepsnet.train.trainer import Trainer

    overrides = parse_overrides(list(a.set))
    if a.data:
        overrides.setdefault("data", {}).update({"train_root": a.data, "val_root": a.data})
    if a.skip_bad:
        overrides.setdefault("data", {})["skip_bad"] = True
    if a.max_iter is not None:
        overrides.setdefault("solver", {})["max_iter"] = a.max_iter
    cfg = load_config(a.config, overrides=overrides)
    if a.weights_partial and not a.weights:
        raise ConfigError("--weights-partial needs --weights")
    for change in apply_input_convention(cfg):  # the pretrained trunk decides channel order and mean/std
        print(f"config: {change}")
    torch.manual_seed(cfg.solver.seed)
    dataset = build_dataset(cfg, train=True)
    # the pretrained trunk is read unless a strict --weights load replaces every weight anyway
    model = build_model(cfg, pretrained=not (a.weights and not a.weights_partial))
    evaluate_fn = None
    if cfg.solver.eval_period and cfg.data.val_root:
        from sepsnet.eval.evaluator import evaluate_model

        val = build_dataset(cfg, train=False)
        evaluate_fn = lambda m, it: evaluate_model(m, val, cfg, out_dir=f"{a.out}/eval_{it:07d}")  # noqa: E731
    try:
        trainer = Trainer(cfg, model, dataset, Collate(cfg.data.size_divisibility), a.out,
                          meta=dataset.meta.to_dict(), device=a.device, evaluate_fn=evaluate_fn,
                          progress=not a.no_progress)
        trainer.resume_or_load(a.resume, a.weights, partial=a.weights_partial)
        last = trainer.run(max_seconds=a.max_minutes * 60 if a.max_minutes else None)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.dist.is_main:
        losses = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith("loss"))
        print(f"done at iteration {trainer.iteration}: {losses}")
        print(f"checkpoint: {trainer.last_checkpoint}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
