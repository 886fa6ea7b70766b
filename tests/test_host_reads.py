"""The host-read detector (``sepsnet.postprocess.host_reads``) catches, on CPU tensors, each kind of
operation that synchronises a CUDA device, and counts nothing for fixed-shape device work."""
import numpy as np
import pytest
import torch
import torchvision

from sepsnet.postprocess.host_reads import HostReadCounter

x = torch.rand(6)
mask = x > 0.5
boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])

READS = {
    "item": lambda: x[0].item(),
    "int": lambda: int(x[0] * 10),
    "float": lambda: float(x[1]),
    "bool (if t:)": lambda: bool(x[0] > 0.5),
    "nonzero": lambda: mask.nonzero(),
    "where(cond)": lambda: torch.where(mask),
    "argwhere": lambda: torch.argwhere(mask),
    "masked_select": lambda: x.masked_select(mask),
    "bool-mask index": lambda: x[mask],
    "bool-mask assign": lambda: x.clone().__setitem__(mask, 0.0),
    "unique": lambda: torch.unique(torch.tensor([1, 2, 2])),
    "unique_consecutive": lambda: torch.unique_consecutive(torch.tensor([1, 2, 2])),
    "unique dim": lambda: torch.unique(torch.ones(3, 2), dim=0),
    "repeat_interleave": lambda: torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 1])),
    "repeat_interleave self": lambda: x.repeat_interleave(torch.ones(6, dtype=torch.long)),
    "bincount": lambda: torch.bincount(torch.tensor([0, 3]), minlength=5),
    "equal": lambda: torch.equal(x, x),
    "nms": lambda: torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5),
    "batched_nms": lambda: torchvision.ops.batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]),
                                                       torch.tensor([0, 0, 1]), 0.5),
    ".cpu()": lambda: x.cpu(),
    ".tolist()": lambda: x.tolist(),
    ".numpy()": lambda: x.numpy(),
    "np.asarray": lambda: np.asarray(x),
}


@pytest.mark.parametrize("name", list(READS))
def test_each_sync_kind_is_counted(name: str) -> None:
    with HostReadCounter() as c:
        READS[name]()
    assert c.reads >= 1, name


def test_fixed_shape_work_reads_nothing() -> None:
    """What a sync-free path uses instead: top-k, sort, gather, where, scatter, index with long
    indices, repeat_interleave with output_size, cumsum, comparisons, reductions to tensors."""
    with HostReadCounter() as c:
        v, i = x.topk(3)
        s = x.sort(descending=True, stable=True).indices
        y = torch.where(mask, x, 0.0)[s] + x.index_select(0, i).sum()
        z = torch.zeros(8).index_add_(0, i, v).cumsum(0)
        r = torch.repeat_interleave(torch.arange(3), torch.ones(3, dtype=torch.long), output_size=3)
        keep = (z > 0.1).any() & (y >= 0).all()
        out = torch.stack([y.sum(), z.amax(), r.sum().float(), keep.float()])
    assert c.reads == 0, c.events
    assert out.shape == (4,)


def test_counts_each_read_and_names_them() -> None:
    with HostReadCounter() as c:
        x.sum().item()
        mask.nonzero()
        x.tolist()
    assert c.reads == 3
    assert c.events == ["aten._local_scalar_dense", "aten.nonzero", "Tensor.tolist"]


def test_cpu_tensor_stays_device_data_after_cpu() -> None:
    """A CPU tensor's ``.cpu()`` is the tensor itself (on CUDA: the copy, host data from then on)."""
    packed = torch.stack([x, x * 2])
    with HostReadCounter() as c:
        host = packed.cpu()
        assert host is packed  # on CPU: still device data, so reading it again counts
        host.tolist()
    assert c.reads == 2


def test_uploads_counted_apart() -> None:
    with HostReadCounter() as c:
        torch.tensor([1, 2])
        torch.as_tensor([3.0])
        torch.zeros(3)
    assert c.reads == 0 and c.uploads == 2


def test_paused_section_is_not_counted() -> None:
    with HostReadCounter() as c:
        x.tolist()
        with c.paused():
            x.sum().item()
            mask.nonzero()
            torch.tensor([1])
        x.cpu()
    assert c.events == ["Tensor.tolist", "Tensor.cpu"] and c.uploads == 0


def test_modes_are_removed_on_exit() -> None:
    with HostReadCounter() as c:
        pass
    x.sum().item()
    assert c.reads == 0
