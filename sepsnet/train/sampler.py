"""Deterministic, resumable batch order and per-sample seeding.

Iteration ``i`` always sees the same images with the same augmentation, whatever
happened before it: the batch for ``i`` comes from an epoch permutation seeded by
``(seed, epoch)``, and every sample is produced with all RNGs seeded by its global
position. ``--resume`` therefore reproduces the uninterrupted loss curve exactly.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is drawn with python/numpy/torch
    RNGs seeded by ``seed``; random augmentations become a pure function of the key."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        random.seed(seed)
        np.random.seed(seed % (2**32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class ResumableBatchSampler(Sampler):
    """Infinite stream of batches of ``(index, seed)`` keys starting at ``start_iter``.

    With ``world_size`` > 1 each rank takes its slice of the global batch (DDP).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int = 0, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if dataset_size < 1:
            raise ValueError("dataset is empty")
        self.size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank
        self.world_size = world_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.size, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def batch_for(self, iteration: int) -> list[tuple[int, int]]:
        global_batch = self.batch_size * self.world_size
        keys = []
        for slot in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            position = iteration * global_batch + slot
            epoch, offset = divmod(position, self.size)
            keys.append((int(self._permutation(epoch)[offset]), self.seed * 1_000_003 + position))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.batch_for(iteration)
            iteration += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs this for len(loader)
        return 2**62
