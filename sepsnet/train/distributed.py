"""``torchrun`` DDP plumbing for the trainer: process group, backend choice and the few
collectives that keep ranks in lock-step (stop flags, loss averaging, barriers).

Every helper is a no-op in a single process (``torch.distributed`` not initialised), so
the trainer calls them unconditionally. Each one is a collective: every rank must call it
at the same point, or the job hangs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "gloo" / "nccl" under torchrun, "" in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device_type: str) -> str:
    """``nccl`` for CUDA training, ``gloo`` for CPU training."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    ``device_type`` (``cpu``/``cuda``) picks the backend (:func:`backend_for`); default:
    ``cuda`` when available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device_type))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_batch_divisible(batch_size: int, world_size: int) -> str | None:
    """``None`` when ``batch_size`` splits evenly over ``world_size`` processes, else an
    error message that says which process counts or batch sizes would work."""
    if world_size <= 1 or batch_size % world_size == 0:
        return None
    counts = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
    up = -(-batch_size // world_size) * world_size
    return (f"solver.batch_size {batch_size} (the global batch) is not divisible by the number of "
            f"processes {world_size}: launch torchrun --nproc_per_node one of {counts}, or keep "
            f"{world_size} processes and pass --set solver.batch_size={up}")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average of scalar tensors over ranks (one all-reduce; every rank must pass the same
    names). A value that is non-finite on any rank stays non-finite in the mean."""
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names]).to(device)
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def barrier() -> None:
    if is_distributed():
        dist.barrier()
