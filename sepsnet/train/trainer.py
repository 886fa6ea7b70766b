"""Training loop: single process (CPU/GPU) or ``torchrun`` DDP, AMP on CUDA, atomic
checkpoints, exact resume, tqdm progress, TensorBoard scalars and a JSON-lines log.

Paper IV-A: SGD (momentum 0.9, weight decay 1e-4), lr 0.01 with a 1k-iteration constant
warm-up, x0.1 at 120k/420k/500k, 600k iterations, batch 6 (all in ``cfg.solver``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from sepsnet.config import SEPSNetConfig
from sepsnet.errors import SEPSNetError
from sepsnet.model.weights import check_compatible, load_checkpoint, load_model_weights
from sepsnet.train.checkpoint import (
    checkpoint_files,
    find_resume_checkpoint,
    first_nonfinite,
    remove_stale_temp_files,
    restore_rng,
    save_checkpoint,
)
from sepsnet.train.distributed import (
    any_rank,
    barrier,
    check_batch_divisible,
    init_distributed,
    mean_over_ranks,
)
from sepsnet.train.metrics_log import MetricsLog, trim_metrics
from sepsnet.train.sampler import ResumableBatchSampler, SeededDataset
from sepsnet.train.schedule import build_optimizer, build_scheduler


class TrainingError(SEPSNetError):
    """Training cannot go on (non-finite loss, empty dataset, ...)."""


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths[:4]) + (", ..." if len(paths) > 4 else "")


def check_fresh_start(out_dir: str | Path, resume: bool) -> None:
    """Without ``resume``, refuse an output folder that already holds ``model_*.pt`` checkpoints
    (a new run would overwrite them). Cheap: the CLI calls it before loading any data."""
    existing = checkpoint_files(out_dir)
    if existing and not resume:
        raise TrainingError(f"{out_dir} already holds checkpoints of an earlier run ({_names(existing)}); pass "
                            "--resume to continue it, or another --out; nothing was changed")


def move_targets(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


def _postfix(metrics: dict[str, float]) -> str:
    """Compact tqdm postfix: every named loss (without the ``loss_`` prefix) and the lr."""
    parts = [f"total={metrics['loss_total']:.3g}"]
    parts += [f"{k[5:]}={v:.3g}" for k, v in metrics.items() if k.startswith("loss_") and k != "loss_total"]
    return " ".join(parts + [f"lr={metrics['lr']:.2e}"])


class Trainer:
    """Owns model, optimizer, schedule and the data stream; ``run()`` trains to ``max_iter``."""

    def __init__(self, cfg: SEPSNetConfig, model: torch.nn.Module, dataset: Dataset,
                 collate_fn: Callable, out_dir: str | Path, meta: dict | None = None,
                 device: str | None = None, evaluate_fn: Callable[[torch.nn.Module, int], dict] | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = init_distributed(device_type)  # gloo on CPU, nccl on CUDA
        if device_type == "cuda" and device in (None, "cuda"):
            device = f"cuda:{self.dist.local_rank}"  # one GPU per torchrun process
        self.device = torch.device(device or "cpu")
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
        self.last_checkpoint: Path | None = None  # the checkpoint holding the current state, once there is one
        self._purge_step: int | None = None  # TensorBoard purge_step after a resume
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise TrainingError("training dataset is empty")
        problem = check_batch_divisible(cfg.solver.batch_size, self.dist.world_size)
        if problem:
            raise TrainingError(problem)
        if self.dist.world_size > 1 and self.dist.is_main:
            print(f"DDP: {self.dist.world_size} processes, backend {self.dist.backend}, "
                  f"{cfg.solver.batch_size // self.dist.world_size} images per process on {self.device.type}")

    # -- state -------------------------------------------------------------------------
    def resume_or_load(self, resume: bool, weights: str | None = None, partial: bool = False) -> None:
        """Prepare the output folder and the start state (DESIGN: nothing is lost on a restart).

        Temp files left by saves killed mid-write are removed first. ``resume``: continue from the
        newest checkpoint in ``out_dir`` that loads (whatever ``last_checkpoint`` says; broken
        newer ones are named and passed over); if ``model_*.pt`` files exist but none loads, stop
        with an error and change nothing. Only once a checkpoint is found are ``metrics.jsonl``
        lines past its iteration (a crashed run's) dropped, and TensorBoard purges those steps.
        Without ``resume``, a folder that already holds checkpoints is refused (they would be
        overwritten). Starting at 0 over an old ``metrics.jsonl`` moves it aside, never deletes it.
        ``weights``: initialise the model only, strictly unless ``partial`` (then missing, unexpected
        and reshaped weights are listed and skipped)."""
        if self.dist.is_main:
            for p in remove_stale_temp_files(self.out_dir):
                print(f"removed {p.name} (temp file of a save that was killed)")
        existing = checkpoint_files(self.out_dir)
        found = find_resume_checkpoint(self.out_dir, map_location=self.device) if resume else None
        if found is not None and self.dist.is_main:
            for path, why in found.skipped:
                print(f"warning: not resuming from {path.name}: {why}")
        if found is not None and found.path is not None:
            assert found.checkpoint is not None
            self._load_state(found.path, found.checkpoint)
            self._purge_step = self.iteration + 1
            if self.dist.is_main:
                dropped = trim_metrics(self.out_dir / "metrics.jsonl", self.iteration)
                if dropped:
                    print(f"dropped {dropped} metrics.jsonl line(s) past iteration {self.iteration}")
            return
        if existing and resume:
            assert found is not None
            why = found.skipped[0][1] if found.skipped else "unreadable"
            raise TrainingError(f"--resume: none of the {len(existing)} checkpoint(s) in {self.out_dir} "
                                f"({_names(existing)}) can be loaded (e.g. {why}); nothing was changed. Move "
                                "them away to start again from iteration 0")
        check_fresh_start(self.out_dir, resume)
        if resume and self.dist.is_main:
            print(f"no checkpoint in {self.out_dir} to resume from; starting at iteration 0")
        self._set_aside_metrics()
        if weights:
            ckpt = load_checkpoint(weights)
            load_model_weights(self.model, ckpt["model"], weights, strict=not partial)

    def _set_aside_metrics(self) -> None:
        """A start from iteration 0 over an old ``metrics.jsonl``: rename it to
        ``metrics.old-N.jsonl`` (first free N) and hide the old TensorBoard steps."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        self._purge_step = 1
        if not self.dist.is_main:
            return
        n = 1
        while (self.out_dir / f"metrics.old-{n}.jsonl").exists():
            n += 1
        path.rename(self.out_dir / f"metrics.old-{n}.jsonl")
        print(f"starting at iteration 0: kept the earlier metrics.jsonl as metrics.old-{n}.jsonl")

    def _load_state(self, path: Path, ckpt: dict[str, Any]) -> None:
        check_compatible(ckpt, self.cfg, path)
        load_model_weights(self.model, ckpt["model"], path)
        if "optimizer" in ckpt:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError, TypeError) as exc:  # e.g. other parameter groups (weight-decay split)
                raise TrainingError(f"{path}: optimizer state does not fit this optimizer ({exc}); "
                                    f"start from it with --weights {path} instead of --resume") from None
        try:
            if "scheduler" in ckpt:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if "scaler" in ckpt and self.use_amp:
                self.scaler.load_state_dict(ckpt["scaler"])
            if "rng" in ckpt:
                restore_rng(ckpt["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise TrainingError(f"{path}: scheduler/scaler/RNG state cannot be restored ({type(exc).__name__}: "
                                f"{exc}); start from it with --weights {path} instead of --resume") from None
        self.iteration = int(ckpt["iteration"])
        self.last_checkpoint = path
        if self.dist.is_main:
            print(f"resumed from {path} at iteration {self.iteration}")

    def save(self, name: str | None = None) -> Path | None:
        """Write ``out_dir/name`` (default ``model_<iteration>.pt``) from the main process.
        Every rank first checks the weights are finite (the same on every rank), so a diverged
        run stops everywhere with :class:`TrainingError` and overwrites no good checkpoint."""
        name = name or f"model_{self.iteration:07d}.pt"
        bad = first_nonfinite(self.model)
        if bad is not None:
            kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingError(f"weights are not finite at iteration {self.iteration} ({bad!r} holds NaN or Inf): "
                                f"not saving {name}{kept}. Lower solver.lr or enable solver.clip_grad_norm")
        if not self.dist.is_main:
            return None
        path = save_checkpoint(self.out_dir / name, model=self.model, cfg=self.cfg, iteration=self.iteration,
                               meta=self.meta, optimizer=self.optimizer, scheduler=self.scheduler,
                               scaler=self.scaler if self.use_amp else None)
        self.last_checkpoint = path
        return path

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
        # one all-reduce, before backward: the mean over ranks is what gets logged (the
        # global batch), and a loss that is non-finite on any rank is non-finite in the
        # mean, so every rank raises here instead of the others waiting in backward
        mean = mean_over_ranks({**losses, "loss_total": total}, self.device)
        if not math.isfinite(mean["loss_total"]):
            bad = {k: v for k, v in mean.items() if not math.isfinite(v)}
            local = {k: float(v.detach()) for k, v in losses.items() if not torch.isfinite(v)}
            where = f" (rank {self.dist.rank}: {local})" if local and self.dist.world_size > 1 else ""
            raise TrainingError(f"loss is not finite at iteration {self.iteration}: {bad}{where}; "
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
        out = {k: mean[k] for k in losses}
        out["loss_total"] = mean["loss_total"]
        out["lr"] = lr
        return out

    def run(self, max_iter: int | None = None, max_seconds: float | None = None) -> dict[str, float]:
        """Train until ``max_iter`` (default ``cfg.solver.max_iter``) or, if given, until
        ``max_seconds`` of wall time have passed; returns the last metrics."""
        solver = self.cfg.solver
        max_iter = solver.max_iter if max_iter is None else max_iter
        if max_iter < 1:
            raise TrainingError(f"max_iter must be >= 1, got {max_iter}")
        last: dict[str, float] = {}
        if self.iteration >= max_iter:
            if self.dist.is_main:
                print(f"already at iteration {self.iteration} >= max_iter {max_iter}: nothing to train")
            if self.last_checkpoint is not None and self.last_checkpoint.name != "model_final.pt":
                # resumed from the last periodic checkpoint of a run killed before its final save
                self.save("model_final.pt")
                barrier()
            return last
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir, self.dist.is_main, purge_step=self._purge_step)
        net = self._wrap_ddp()
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=max_iter, initial=self.iteration, desc="train", dynamic_ncols=True)
        data = iter(self._loader())
        start = t_begin = time.perf_counter()
        logged_at = self.iteration
        try:
            while self.iteration < max_iter:
                # every rank must stop at the same iteration (clocks differ): stop when any
                # rank is past the budget
                if max_seconds is not None and any_rank(time.perf_counter() - t_begin > max_seconds,
                                                        self.device):
                    if self.dist.is_main:
                        print(f"time budget of {max_seconds:.0f} s reached at iteration {self.iteration}")
                    break
                images, targets = self._unpack(next(data))
                last = self.step(net, images, targets)
                self.iteration += 1
                if self.iteration % solver.log_period == 0 or self.iteration == max_iter:
                    last["time_per_iter"] = (time.perf_counter() - start) / (self.iteration - logged_at)
                    start, logged_at = time.perf_counter(), self.iteration
                    log.write(self.iteration, last)
                if bar is not None:
                    bar.set_postfix_str(_postfix(last), refresh=False)
                    bar.update(1)
                if solver.checkpoint_period and self.iteration % solver.checkpoint_period == 0:
                    self.save()
                if self.evaluate_fn and solver.eval_period and self.iteration % solver.eval_period == 0:
                    if self.dist.is_main:
                        metrics = self.evaluate_fn(self.model, self.iteration)
                        log.write(self.iteration, {f"val/{k}": v for k, v in metrics.items()
                                                   if isinstance(v, (int, float)) and math.isfinite(v)})
                    # the other ranks wait here for rank 0's evaluation (pass evaluate_fn on
                    # every rank). Caveat: the wait is bounded by the process-group timeout
                    # (NCCL: 10 min by default); an evaluation that takes longer kills the job,
                    # so keep the val set small or raise the timeout of init_process_group.
                    barrier()
            self.save("model_final.pt")
            barrier()  # every rank returns with model_final.pt on disk
        finally:
            if bar is not None:
                bar.close()
            log.close()
        return last

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        images, targets = batch[0], batch[1]
        return images.to(self.device, non_blocking=True), move_targets(targets, self.device)
