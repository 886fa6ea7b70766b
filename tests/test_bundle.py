"""Export bundle manifest: content, atomic write, and the refusals of verify_bundle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from sepsnet.config import SEPSNetConfig, config_from_dict
from sepsnet.errors import BundleError
from sepsnet.export import bundle


def _tiny_onnx(path: Path) -> None:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, "h", 8])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _make_bundle(root: Path, *, plans: bool = False, trt: str | None = None, gpu: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _tiny_onnx(root / "dense.onnx")
    _tiny_onnx(root / "instance.onnx")
    graphs = {name: {"onnx": f"{name}.onnx", "engine_onnx": f"{name}.onnx", "plan": None,
                     **bundle.tensor_specs(root / f"{name}.onnx")} for name in ("dense", "instance")}
    if plans:
        for name in graphs:
            (root / f"{name}.plan").write_bytes(np.random.default_rng(0).bytes(64))
            graphs[name]["plan"] = f"{name}.plan"
    cfg = SEPSNetConfig()
    ranges = {"batch": [1, 1, 1], "height": [64, 64, 64], "width": [96, 96, 96]}
    content = bundle.manifest_content(cfg, None, ranges=ranges, dynamic=False,
                                      instances={"min": 0, "opt": 8, "max": 100}, precision="fp16", opset=18,
                                      graphs=graphs, gpu=gpu)
    content["versions"]["tensorrt"] = trt
    bundle.write_manifest(root, content)
    return root


def test_manifest_content_and_roundtrip(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    m = bundle.verify_bundle(root)
    assert m["format"] == bundle.FORMAT
    assert set(m["files"]) == {"dense.onnx", "instance.onnx"}
    assert m["files"]["dense.onnx"]["sha256"] == bundle.sha256_file(root / "dense.onnx")
    cfg = SEPSNetConfig()
    assert m["alpha"] == cfg.postprocess.alpha == 0.8
    assert set(m["postprocess"]) == set(vars(cfg.postprocess))  # every threshold is recorded
    assert len(m["classes"]["things"]) == cfg.model.num_thing_classes
    assert len(m["classes"]["stuff"]) == cfg.model.num_stuff_classes
    assert m["input"]["ranges"]["width"] == [96, 96, 96]
    assert m["graphs"]["dense"]["inputs"] == [{"name": "image", "shape": [1, 3, "h", 8], "dtype": "float32"}]
    assert m["versions"]["onnx"] == onnx.__version__
    assert config_from_dict(m["config"]).postprocess == cfg.postprocess
    # load_manifest accepts the folder or the file; no temp file is left behind
    assert bundle.load_manifest(root / "manifest.json")["precision"] == "fp16"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_sha256_mismatch(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    with open(root / "instance.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 mismatch for 'instance.onnx'"):
        bundle.verify_bundle(root)


def test_missing_file(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    (root / "dense.onnx").unlink()
    with pytest.raises(BundleError, match=r"'dense.onnx'.*missing"):
        bundle.verify_bundle(root)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        bundle.load_manifest(tmp_path / "empty")


def test_unknown_format_version(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["format"] = "sepsnet-bundle/99"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"unknown bundle format version 'sepsnet-bundle/99'"):
        bundle.verify_bundle(root)


def test_corrupt_manifest(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        bundle.load_manifest(root)


def test_foreign_tensorrt_version(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b", plans=True, trt="10.3.0", gpu="NVIDIA Jetson Orin")
    # without the TensorRT check (ORT backend) the bundle is fine
    assert bundle.has_plans(bundle.verify_bundle(root))
    with pytest.raises(BundleError, match=r"TensorRT 10\.3\.0.*TensorRT 11\.0\.1"):
        bundle.verify_bundle(root, check_trt=True, trt_version="11.0.1", gpu_name="NVIDIA Jetson Orin")
    with pytest.raises(BundleError, match=r"cannot be imported"):
        bundle.verify_bundle(root, check_trt=True, trt_version=None, gpu_name=None)


def test_foreign_gpu(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b", plans=True, trt="10.3.0", gpu="NVIDIA Jetson Orin")
    with pytest.raises(BundleError, match=r"'NVIDIA Jetson Orin'.*'NVIDIA H100 80GB HBM3'"):
        bundle.verify_bundle(root, check_trt=True, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    m = bundle.verify_bundle(root, check_trt=True, trt_version="10.3.0", gpu_name="NVIDIA Jetson Orin")
    assert m["graphs"]["dense"]["plan"] == "dense.plan"


def test_unlisted_plan_is_refused(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["graphs"]["dense"]["plan"] = "dense.plan"  # names a file the bundle does not list
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not listed"):
        bundle.verify_bundle(root)


def test_unlisted_trt10_engine_graph_is_refused(tmp_path: Path) -> None:
    """engine_onnx_trt10 (the graph TensorRT 10 builds) is checked like engine_onnx."""
    root = _make_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    data["graphs"]["dense"]["engine_onnx_trt10"] = "dense.int8.onnx"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"engine_onnx_trt10 file 'dense.int8.onnx' is not listed"):
        bundle.verify_bundle(root)
