"""Dataset construction from a config (COCO panoptic layout; Cityscapes via its converter)."""
from __future__ import annotations

from typing import Optional

from sepsnet.config import SEPSNetConfig
from sepsnet.data.cityscapes import CityscapesDataset
from sepsnet.data.coco_panoptic import CocoPanopticDataset
from sepsnet.errors import DataError


def build_dataset(cfg: SEPSNetConfig, train: bool, root: Optional[str] = None,
                  split: Optional[str] = None) -> CocoPanopticDataset:
    """The train (``train=True``) or val dataset named by ``cfg.data``."""
    d = cfg.data
    root = root or (d.train_root if train else d.val_root)
    split = split or (d.train_split if train else d.val_split)
    if not root:
        raise DataError(f"no dataset root: set data.{'train' if train else 'val'}_root or pass --data")
    if d.format == "cityscapes":
        ds: CocoPanopticDataset = CityscapesDataset(root, split, d, train)
    else:
        ds = CocoPanopticDataset.from_root(root, split, d, train)
    if len(ds.meta.things) != cfg.model.num_thing_classes or len(ds.meta.stuff) != cfg.model.num_stuff_classes:
        raise DataError(f"{ds.json_path} has {len(ds.meta.things)} thing / {len(ds.meta.stuff)} stuff classes "
                        f"but the config says {cfg.model.num_thing_classes} / {cfg.model.num_stuff_classes}")
    return ds
