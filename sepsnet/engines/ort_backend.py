"""ONNX Runtime backend: CUDA execution provider when available (IO binding on torch CUDA
tensors, no host copies), else CPU. One session per graph, created once."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from sepsnet.engines.backend import TensorSpec
from sepsnet.errors import EngineError

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
       "tensor(int32)": np.int32}


class OrtBackend:
    def __init__(self, onnx_path: Union[str, Path], device: str = "auto", threads: Optional[int] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise EngineError(f"onnxruntime is not installed: {exc}") from None
        path = Path(onnx_path)
        if not path.is_file():
            raise EngineError(f"ONNX graph not found: {path}")
        available = ort.get_available_providers()
        use_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available and torch.cuda.is_available()
        if device == "cuda" and not use_cuda:
            raise EngineError("device='cuda' asked, but onnxruntime has no CUDAExecutionProvider or no GPU is visible "
                              f"(providers: {available})")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise EngineError(f"onnxruntime cannot load {path}: {exc}") from None
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.name = f"onnxruntime-{'cuda' if use_cuda else 'cpu'}"
        self.path = path

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec(i.name, tuple(i.shape), i.type.replace("tensor(", "").rstrip(")"))
                for i in self.session.get_inputs()]

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return [TensorSpec(o.name, tuple(o.shape), o.type.replace("tensor(", "").rstrip(")"))
                for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = [o.name for o in self.session.get_outputs()]
        if self.device.type == "cuda":
            return self._run_bound(feeds, names)
        inputs = {}
        for spec in self.session.get_inputs():
            if spec.name not in feeds:
                raise EngineError(f"{self.path.name}: missing input {spec.name!r}")
            inputs[spec.name] = feeds[spec.name].detach().cpu().numpy().astype(_NP.get(spec.type, np.float32), copy=False)
        out = self.session.run(names, inputs)
        return {n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in zip(names, out)}

    def _run_bound(self, feeds: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        keep = []
        for spec in self.session.get_inputs():
            t = feeds[spec.name].to(self.device).contiguous()
            t = t.to(torch.int64) if spec.type == "tensor(int64)" else t.float()
            keep.append(t)
            binding.bind_input(spec.name, "cuda", t.device.index or 0, _NP.get(spec.type, np.float32),
                               tuple(t.shape), t.data_ptr())
        for n in names:
            binding.bind_output(n, "cuda")
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack") else torch.from_numpy(o.numpy())
                for n, o in zip(names, outs)}
