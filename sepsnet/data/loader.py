"""Datasets and DataLoaders from a config: COCO panoptic layout or Cityscapes official layout."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from sepsnet.config import SEPSNetConfig
from sepsnet.data.cityscapes import CityscapesDataset
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.data.transforms import Collate
from sepsnet.errors import DataError

FORMATS = ("coco_panoptic", "cityscapes")


def build_dataset(cfg: SEPSNetConfig, train: bool, root: str | None = None,
                  split: str | None = None) -> CocoPanopticDataset:
    """The train (``train=True``) or val dataset named by ``cfg.data`` (``root``/``split``
    override ``data.{train,val}_root`` / ``data.{train,val}_split``). Checks that the class
    counts match ``cfg.model``."""
    d = cfg.data
    root = root or (d.train_root if train else d.val_root)
    split = split or (d.train_split if train else d.val_split)
    if not root:
        raise DataError(f"no dataset root: set data.{'train' if train else 'val'}_root or pass --data")
    if d.format == "cityscapes":
        ds: CocoPanopticDataset = CityscapesDataset(root, split, d, train)
    elif d.format == "coco_panoptic":
        ds = CocoPanopticDataset.from_root(root, split, d, train)
    else:
        raise DataError(f"data.format must be one of {FORMATS}, got {d.format!r}")
    if len(ds.meta.things) != cfg.model.num_thing_classes or len(ds.meta.stuff) != cfg.model.num_stuff_classes:
        raise DataError(f"{ds.json_path} has {len(ds.meta.things)} thing / {len(ds.meta.stuff)} stuff classes "
                        f"but the config says {cfg.model.num_thing_classes} / {cfg.model.num_stuff_classes}")
    return ds


def build_dataloader(dataset: Dataset, cfg: SEPSNetConfig, train: bool, batch_size: int | None = None,
                     num_workers: int | None = None) -> DataLoader:
    """Batches of ``(images (N,3,H,W), targets, infos)`` (padded collate). ``batch_size`` is per
    process (default: ``solver.batch_size`` split over the world size when training, 1 for
    evaluation). Under ``torch.distributed`` a :class:`DistributedSampler` shards the data
    (call ``loader.sampler.set_epoch(e)`` each epoch); otherwise random order when training."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if distributed else 1
    if batch_size is None:
        batch_size = max(1, cfg.solver.batch_size // world) if train else 1
    workers = cfg.data.num_workers if num_workers is None else num_workers
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=cfg.solver.seed, drop_last=train)
    elif train:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.solver.seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=Collate(cfg.data.size_divisibility), drop_last=train,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
