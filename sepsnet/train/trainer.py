"""Training loop: single process (CPU/GPU) or ``torchrun`` DDP, AMP on CUDA, atomic
checkpoints, exact resume, tqdm progress, TensorBoard scalars and a JSON-lines log.

Paper IV-A: SGD (momentum 0.9, weight decay 1e-4), lr 0.01 with a 1k-iteration constant
warm-up, x0.1 at 120k/420k/500k, 600k iterations, batch 6 (all in ``cfg.solver``).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import SEPSNetError
from sepsnet.model.weights import check_compatible, load_checkpoint, load_model_weights
from sepsnet.train.checkpoint import latest_checkpoint, restore_rng, save_checkpoint
from sepsnet.train.sampler import ResumableBatchSampler, SeededDataset
from sepsnet.train.schedule import build_optimizer, build_scheduler


class TrainingError(SEPSNetError):
    """Training cannot go on (non-finite loss, empty dataset, ...)."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), world, local)


def move_targets(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


class MetricsLog:
    """JSON-lines metrics file + optional TensorBoard writer (main process only)."""

    def __init__(self, out_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.path = out_dir / "metrics.jsonl"
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # tensorboard missing or broken: keep the JSON log
                self.tb = None

    def write(self, iteration: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """Owns model, optimizer, schedule and the data stream; ``run()`` trains to ``max_iter``."""

    def __init__(self, cfg: SEPSNetConfig, model: torch.nn.Module, dataset: Dataset,
                 collate_fn: Callable, out_dir: str | Path, meta: Optional[dict] = None,
                 device: Optional[str] = None, evaluate_fn: Optional[Callable[[torch.nn.Module, int], dict]] = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist = init_distributed()
        self.device = torch.device(device or (f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.solver)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.use_amp = bool(cfg.solver.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.meta = meta
        self.evaluate_fn = evaluate_fn
        self.progress = progress
        self.iteration = 0
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise TrainingError("training dataset is empty")
        if cfg.solver.batch_size % self.dist.world_size:
            raise TrainingError(f"solver.batch_size {cfg.solver.batch_size} is not divisible by "
                                f"the number of processes {self.dist.world_size}")

    # -- state -------------------------------------------------------------------------
    def resume_or_load(self, resume: bool, weights: Optional[str] = None) -> None:
        """``resume``: continue from ``out_dir/last_checkpoint``; ``weights``: init only."""
        path = latest_checkpoint(self.out_dir) if resume else None
        if resume and path is None and self.dist.is_main:
            print(f"no checkpoint in {self.out_dir} to resume from; starting at iteration 0")
        if path is None and weights:
            ckpt = load_checkpoint(weights)
            load_model_weights(self.model, ckpt["model"], weights, strict=False)
            return
        if path is None:
            return
        ckpt = load_checkpoint(path, map_location=self.device)
        check_compatible(ckpt, self.cfg, path)
        load_model_weights(self.model, ckpt["model"], path)
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt and self.use_amp:
            self.scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            restore_rng(ckpt["rng"])
        self.iteration = int(ckpt["iteration"])
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        name = name or f"model_{self.iteration:07d}.pt"
        return save_checkpoint(self.out_dir / name, model=self.model, cfg=self.cfg, iteration=self.iteration,
                               meta=self.meta, optimizer=self.optimizer, scheduler=self.scheduler,
                               scaler=self.scaler if self.use_amp else None)

    # -- loop ----------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        per_rank = self.cfg.solver.batch_size // self.dist.world_size
        sampler = ResumableBatchSampler(len(self.dataset), per_rank, seed=self.cfg.solver.seed,  # type: ignore[arg-type]
                                        start_iter=self.iteration, rank=self.dist.rank,
                                        world_size=self.dist.world_size)
        workers = self.cfg.data.num_workers
        return DataLoader(SeededDataset(self.dataset), batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=workers, persistent_workers=False,
                          # own generator: creating the loader must not consume the global RNG
                          # (the model's positive sampling draws from it; resume restores it)
                          generator=torch.Generator().manual_seed(self.cfg.solver.seed + self.iteration),
                          pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None)

    def _wrap_ddp(self) -> torch.nn.Module:
        if self.dist.world_size <= 1:
            return self.model
        ids = [self.dist.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)

    def step(self, net: torch.nn.Module, images: torch.Tensor, targets: list[dict[str, Any]]) -> dict[str, float]:
        """One SGD step; raises :class:`TrainingError` on a non-finite loss."""
        net.train()
        with torch.autocast(self.device.type, enabled=self.use_amp):
            losses = net(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
            raise TrainingError(f"loss is not finite at iteration {self.iteration}: {bad}; "
                                f"lower solver.lr or enable solver.clip_grad_norm")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.solver.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss_total"] = float(total.detach())
        out["lr"] = lr
        return out

    def run(self, max_iter: Optional[int] = None, max_seconds: Optional[float] = None) -> dict[str, float]:
        """Train until ``max_iter`` (default ``cfg.solver.max_iter``) or, if given, until
        ``max_seconds`` of wall time have passed; returns the last metrics."""
        solver = self.cfg.solver
        max_iter = max_iter or solver.max_iter
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir, self.dist.is_main)
        net = self._wrap_ddp()
        last: dict[str, float] = {}
        if self.iteration >= max_iter:
            return last
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=max_iter, initial=self.iteration, desc="train", dynamic_ncols=True)
        data = iter(self._loader())
        start = t_begin = time.perf_counter()
        try:
            while self.iteration < max_iter:
                if max_seconds is not None and time.perf_counter() - t_begin > max_seconds:
                    if self.dist.is_main:
                        print(f"time budget of {max_seconds:.0f} s reached at iteration {self.iteration}")
                    break
                images, targets = self._unpack(next(data))
                last = self.step(net, images, targets)
                self.iteration += 1
                if self.iteration % solver.log_period == 0 or self.iteration == max_iter:
                    last["time_per_iter"] = (time.perf_counter() - start) / solver.log_period
                    start = time.perf_counter()
                    log.write(self.iteration, last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss_total']:.3f}", lr=f"{last['lr']:.2e}")
                if solver.checkpoint_period and self.iteration % solver.checkpoint_period == 0:
                    self.save()
                if self.evaluate_fn and solver.eval_period and self.iteration % solver.eval_period == 0:
                    if self.dist.is_main:
                        metrics = self.evaluate_fn(self.model, self.iteration)
                        log.write(self.iteration, {f"val/{k}": v for k, v in metrics.items()
                                                   if isinstance(v, (int, float)) and math.isfinite(v)})
            self.save("model_final.pt")
        finally:
            if bar is not None:
                bar.close()
            log.close()
        return last

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        images, targets = batch[0], batch[1]
        return images.to(self.device, non_blocking=True), move_targets(targets, self.device)
