"""What a TensorRT plan needs from the machine that runs it, recorded at build time and checked at load.

TensorRT's own rules (Developer Guide, "Engine Compatibility"):
- TensorRT version: a plan runs only on the exact TensorRT version that built it, unless it was built
  version-compatible (``BuilderFlag.VERSION_COMPATIBLE``, TensorRT >= 8.6): then any later TensorRT
  runs it (the lean runtime inside the plan; the runtime must allow its host code).
- GPU: a plan holds kernels for the compute capability (SM) of the GPU it was built on, so it runs on
  GPUs of that compute capability only, whatever their marketing names; with
  ``hardware_compatibility_level = AMPERE_PLUS`` on every compute capability >= 8.0 (not on
  Jetson/DRIVE), with ``SAME_COMPUTE_CAPABILITY`` (newer TensorRT) on the same compute capability.

The manifest's ``engine`` block records ``tensorrt`` (exact version), ``compute_capability``
(``"8.6"``), ``gpu`` (name, for messages only), ``hardware_compatibility`` (``none`` | ``ampere_plus``
| ``same_compute_capability``) and ``version_compatible``. :func:`check_plan_compatible` compares it
with :class:`Runtime` (the TensorRT version here and the compute capability of the device that will
run the plan, not device 0) and names expected, found and the command that rebuilds.
"""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Any

from sepsnet.errors import BundleError

AMPERE = (8, 0)
JETSON_CC = ((5, 3), (6, 2), (7, 2), (8, 7), (10, 1), (11, 0))  # integrated GPUs: no hardware compatibility


@dataclass(frozen=True)
class EngineTarget:
    """What a plan was built for (the manifest ``engine`` block)."""

    tensorrt: str
    compute_capability: str
    gpu: str
    hardware_compatibility: str = "none"
    version_compatible: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Runtime:
    """The machine about to run a plan: TensorRT version (None: not importable), and the device."""

    tensorrt: str | None
    compute_capability: str | None  # None: no CUDA device
    gpu: str | None
    device: int = 0


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(text).split(".") if p.isdigit())


def cc_string(major: int, minor: int) -> str:
    return f"{major}.{minor}"


def device_info(device: int | None = None) -> tuple[int, str, str]:
    """(index, compute capability ``"M.m"``, name) of ``device`` (default: torch's current device)."""
    import torch

    from sepsnet.errors import EngineError

    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU visible to PyTorch")
    index = torch.cuda.current_device() if device is None else int(device)
    if not 0 <= index < torch.cuda.device_count():
        raise EngineError(f"CUDA device {index} does not exist (this machine has {torch.cuda.device_count()})")
    major, minor = torch.cuda.get_device_capability(index)
    return index, cc_string(major, minor), torch.cuda.get_device_name(index)


def current_runtime(device: int | None = None) -> Runtime:
    """The Runtime of this machine for ``device`` (TensorRT version None when it cannot be imported)."""
    from sepsnet.errors import EngineError
    from sepsnet.export.trt_build import trt_version

    try:
        index, cc, name = device_info(device)
    except EngineError:
        return Runtime(trt_version(), None, None, 0 if device is None else int(device))
    return Runtime(trt_version(), cc, name, index)


def rebuild_command(where: str, manifest: dict[str, Any]) -> str:
    """The sepsnet-export command that rebuilds this bundle's plans here, with the bundle's own choices."""
    flags = [f"--{manifest.get('precision', 'fp32')}"]
    engine = manifest.get("engine") or {}
    if engine.get("hardware_compatibility") == "ampere_plus":
        flags.append("--hardware-compatible")
    if engine.get("version_compatible"):
        flags.append("--version-compatible")
    return f"sepsnet-export --from-onnx {shlex.quote(where)} {' '.join(flags)}"


def _fallback(where: str) -> str:
    return f"or run the ONNX graphs with backend='ort' (sepsnet-bench/sepsnet-demo --backend ort {where})"


def check_plan_compatible(manifest: dict[str, Any], runtime: Runtime, where: str = "bundle") -> None:
    """Refuse plans this runtime cannot run; BundleError saying expected, found and how to rebuild."""
    engine = manifest.get("engine")
    rebuild = f"rebuild them here with `{rebuild_command(where, manifest)}`, {_fallback(where)}"
    if not engine:
        raise BundleError(f"{where}: the TensorRT plans do not record what they were built for (TensorRT version, "
                          f"compute capability; bundle from an older sepsnet-export): {rebuild}")
    target = EngineTarget(**engine)
    built_on = f"TensorRT {target.tensorrt} on {target.gpu} (compute capability {target.compute_capability})"
    if runtime.tensorrt is None:
        raise BundleError(f"{where}: the plans need TensorRT {target.tensorrt} (built with {built_on}), found no "
                          f"importable tensorrt here; install it, {_fallback(where)}")
    have, built = version_tuple(runtime.tensorrt), version_tuple(target.tensorrt)
    if target.version_compatible:
        if have < built:
            raise BundleError(f"{where}: the version-compatible plans need TensorRT {target.tensorrt} or later "
                              f"(built with {built_on}), found TensorRT {runtime.tensorrt}: {rebuild}")
    elif have != built:
        raise BundleError(f"{where}: the plans need exactly TensorRT {target.tensorrt} (built with {built_on}; "
                          f"not version-compatible), found TensorRT {runtime.tensorrt}: {rebuild}")
    if runtime.compute_capability is None:
        raise BundleError(f"{where}: the plans need an NVIDIA GPU of compute capability {target.compute_capability} "
                          f"(built with {built_on}), found no CUDA device: {_fallback(where)}")
    cc = version_tuple(runtime.compute_capability)
    found = f"{runtime.gpu} (device {runtime.device}, compute capability {runtime.compute_capability})"
    if target.hardware_compatibility == "ampere_plus":
        if cc < AMPERE or cc in JETSON_CC:
            raise BundleError(f"{where}: the hardware-compatible plans need a discrete GPU of compute capability "
                              f">= 8.0 (Ampere or newer; built with {built_on}), found {found}: {rebuild}")
    elif cc != version_tuple(target.compute_capability):
        raise BundleError(f"{where}: the plans need a GPU of compute capability {target.compute_capability} "
                          f"(built with {built_on}), found {found}: {rebuild}")


def build_target(trt_version: str, device: int | None, hardware_compatible: bool,
                 version_compatible: bool) -> EngineTarget:
    """The EngineTarget of a build on ``device``; EngineError when the GPU cannot build what is asked."""
    from sepsnet.errors import EngineError

    _, cc, name = device_info(device)
    if hardware_compatible and (version_tuple(cc) < AMPERE or version_tuple(cc) in JETSON_CC):
        raise EngineError(f"--hardware-compatible needs a discrete Ampere or newer GPU (compute capability >= 8.0) "
                          f"to build on; this is {name} (compute capability {cc}). Build without it.")
    return EngineTarget(tensorrt=trt_version, compute_capability=cc, gpu=name,
                        hardware_compatibility="ampere_plus" if hardware_compatible else "none",
                        version_compatible=version_compatible)
