"""Count the operations that would make a CUDA device wait for the host, on any device (issue 13).

``torch.cuda.set_sync_debug_mode`` reports device->host synchronisations only where a GPU runs.
:class:`HostReadCounter` finds the same operations on CPU tensors, so tests on a machine without a
GPU can show that a code path is sync-free: a ``TorchDispatchMode`` sees the ATen operators (and
torchvision's ``nms``), a ``TorchFunctionMode`` the tensor methods that hand data to Python without
an operator (``.cpu()``, ``.tolist()``, ``.numpy()``, ``__array__``).

What counts as a host read (it synchronises on CUDA):

- ``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` (``if t:``);
- outputs sized by the data: ``nonzero`` (``torch.where(c)``, ``argwhere``), ``masked_select``,
  boolean-mask indexing and boolean-mask assignment (``aten.index``/``index_put_`` with bool indices),
  ``unique*``, ``repeat_interleave`` without ``output_size``, ``bincount`` and ``histc`` (CUDA reads
  the extremes), torchvision ``nms``;
- ``aten.equal`` (returns a Python bool);
- ``.cpu()``, ``.tolist()``, ``.numpy()``, ``__array__`` (NumPy conversion). The copy a counted
  ``.cpu()`` makes is host data: reading it (or a tensor computed from host data alone) is not
  counted; on CPU tensors ``.cpu()`` returns the tensor itself, which stays device data.

Host data put on the device (``torch.tensor``/``as_tensor``: a blocking host->device
copy on CUDA, which ``set_sync_debug_mode`` also reports) is counted apart as ``uploads``. Not
seen: ``.to(device)`` between devices (on CPU tensors the source and target are the same device).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: ATen operators (overload packet names) that read the device on CUDA whatever their arguments
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "bincount", "histc", "equal",
})
#: operators that read the device only with boolean indices
BOOL_INDEX_OPS = frozenset({"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"})
#: tensor methods that hand the data to Python (no ATen operator runs for them on CPU)
HOST_METHODS = frozenset({"cpu", "tolist", "numpy", "__array__"})
#: factories that take host data (a blocking host->device copy when the target is CUDA)
UPLOAD_FUNCS = frozenset({"tensor", "as_tensor"})


@dataclass
class HostReadCounter:
    """``with HostReadCounter() as c: ...`` then ``c.reads`` (host reads) and ``c.uploads``.

    ``c.events`` lists what was counted, in order (``"aten.nonzero"``, ``"Tensor.cpu"``, ...), for
    assertion messages. ``with c.paused(): ...`` counts nothing inside (e.g. an engine's own I/O)."""

    events: list[str] = field(default_factory=list)
    upload_events: list[str] = field(default_factory=list)
    _host: Any = field(default=None, repr=False)
    _modes: tuple = field(default=(), repr=False)
    _paused: int = field(default=0, repr=False)

    @property
    def reads(self) -> int:
        return len(self.events)

    @property
    def uploads(self) -> int:
        return len(self.upload_events)

    def __enter__(self) -> HostReadCounter:
        self._host = weakref.WeakValueDictionary()
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = ()

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _is_host(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self._host.get(id(t)) is t

    def _mark_host(self, out: Any) -> None:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = t


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        namespace = func.namespace
        counted = False
        if namespace == "aten" and packet in SYNC_OPS:
            counted = not (packet == "_local_scalar_dense" and self.counter._is_host(args[0]))
        elif namespace == "aten" and packet in BOOL_INDEX_OPS:
            counted = _has_bool_index(args)
        elif namespace == "aten" and packet == "repeat_interleave":
            counted = func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
        elif namespace == "torchvision" and packet == "nms":
            counted = True
        if counted and not self.counter._paused:
            self.counter.events.append(f"{namespace}.{packet}")
        out = func(*args, **kwargs)
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if inputs and all(self.counter._is_host(a) for a in inputs):  # derived from host data
            self.counter._mark_host(out)
        return out


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counter: HostReadCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if self.counter._paused:
            return out
        if name in HOST_METHODS and args and isinstance(args[0], torch.Tensor) \
                and not self.counter._is_host(args[0]):
            self.counter.events.append(f"Tensor.{name}")
            if name == "cpu" and out is not args[0]:  # a CPU tensor's .cpu() is itself: still device data
                self.counter._mark_host(out)
        elif name in UPLOAD_FUNCS and getattr(func, "__module__", "") in ("torch", "torch._C._VariableFunctions"):
            self.counter.upload_events.append(f"torch.{name}")
        return out
