"""Engine guard (issue 15 item 4): what a TensorRT plan needs (exact TensorRT version unless version-compatible,
the compute capability of the device that runs it unless hardware-compatible) checked against fake manifests
for every mismatch kind; the build-side settings against a fake TensorRT builder config."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from test_bundle import _make_bundle  # tests/ is on sys.path (pytest rootdir-less test modules)

from sepsnet.cli.export import parse_args
from sepsnet.errors import BundleError, EngineError
from sepsnet.export import engine_guard, trt_build
from sepsnet.export.engine_guard import EngineTarget, Runtime, check_plan_compatible


def _manifest(precision: str = "fp16", **engine) -> dict:
    target = {"tensorrt": "10.3.0", "compute_capability": "8.6", "gpu": "NVIDIA GeForce RTX 3090",
              "hardware_compatibility": "none", "version_compatible": False}
    target.update(engine)
    return {"precision": precision, "engine": target}


RTX3090 = Runtime("10.3.0", "8.6", "NVIDIA GeForce RTX 3090", 0)


def _refused(manifest: dict, runtime: Runtime, *needles: str) -> str:
    with pytest.raises(BundleError) as err:
        check_plan_compatible(manifest, runtime, "bundles/b")
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "\n" not in msg
    return msg


def test_same_machine_runs() -> None:
    check_plan_compatible(_manifest(), RTX3090, "bundles/b")


def test_other_gpu_name_same_compute_capability_runs() -> None:
    """Plans follow the compute capability, not the marketing name (an A10 is sm_86 like a 3090)."""
    check_plan_compatible(_manifest(), Runtime("10.3.0", "8.6", "NVIDIA A10", 0), "bundles/b")


def test_tensorrt_version_must_match_exactly() -> None:
    msg = _refused(_manifest(), Runtime("10.3.1", "8.6", "NVIDIA GeForce RTX 3090", 0),
                   "exactly TensorRT 10.3.0", "found TensorRT 10.3.1", "sepsnet-export --from-onnx bundles/b --fp16")
    assert "backend='ort'" in msg
    _refused(_manifest(), Runtime("11.1.0", "8.6", "x", 0), "exactly TensorRT 10.3.0", "found TensorRT 11.1.0")


def test_version_compatible_plans_run_on_later_tensorrt_only() -> None:
    vc = _manifest(version_compatible=True)
    check_plan_compatible(vc, Runtime("10.16.1", "8.6", "x", 0), "b")
    check_plan_compatible(vc, Runtime("11.1.0", "8.6", "x", 0), "b")
    _refused(vc, Runtime("10.2.0", "8.6", "x", 0), "TensorRT 10.3.0 or later", "found TensorRT 10.2.0",
             "--fp16 --version-compatible")


def test_no_tensorrt_or_no_gpu() -> None:
    _refused(_manifest(), Runtime(None, "8.6", "x", 0), "need TensorRT 10.3.0", "no importable tensorrt")
    _refused(_manifest(), Runtime("10.3.0", None, None, 0), "compute capability 8.6", "no CUDA device")


def test_compute_capability_mismatch_names_device_and_both_capabilities() -> None:
    msg = _refused(_manifest("int8"), Runtime("10.3.0", "8.0", "NVIDIA A100-SXM4-80GB", 1),
                   "compute capability 8.6", "NVIDIA A100-SXM4-80GB (device 1, compute capability 8.0)",
                   "sepsnet-export --from-onnx bundles/b --int8")
    assert "NVIDIA GeForce RTX 3090" in msg  # where it was built


def test_hardware_compatible_plans_need_discrete_ampere_or_newer() -> None:
    hc = _manifest(hardware_compatibility="ampere_plus")
    for cc in ("8.0", "8.6", "8.9", "9.0", "12.0"):
        check_plan_compatible(hc, Runtime("10.3.0", cc, "x", 0), "b")
    _refused(hc, Runtime("10.3.0", "7.5", "Tesla T4", 0), ">= 8.0", "Tesla T4", "--hardware-compatible")
    _refused(hc, Runtime("10.3.0", "8.7", "Orin", 0), ">= 8.0", "Orin (device 0, compute capability 8.7)")
    _refused(hc, Runtime("10.3.1", "8.6", "x", 0), "exactly TensorRT 10.3.0")  # the version rule still holds


def test_old_bundle_without_engine_block() -> None:
    _refused({"precision": "fp32", "engine": None}, RTX3090, "do not record", "--from-onnx bundles/b --fp32")


@pytest.mark.parametrize("engine", [{}, {"hardware_compatibility": "ampere_plus"}, {"version_compatible": True},
                                    {"hardware_compatibility": "ampere_plus", "version_compatible": True}])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_rebuild_command_is_a_valid_sepsnet_export_command(precision: str, engine: dict) -> None:
    """Every flag the hint prints exists (the old hint printed --fp32, which the CLI lacked)."""
    manifest = _manifest(precision, **engine)
    words = shlex.split(engine_guard.rebuild_command("my bundle/b", manifest))
    assert words[:3] == ["sepsnet-export", "--from-onnx", "my bundle/b"]
    args = parse_args(words[1:])
    assert args.from_onnx == "my bundle/b" and args.precision == precision
    assert args.hardware_compatible == (engine.get("hardware_compatibility") == "ampere_plus")
    assert args.version_compatible == bool(engine.get("version_compatible"))


def test_build_target_records_the_build_device(monkeypatch) -> None:
    monkeypatch.setattr(engine_guard, "device_info", lambda device=None: (1, "7.5", "Tesla T4"))
    t = engine_guard.build_target("10.16.1", None, hardware_compatible=False, version_compatible=True)
    assert t == EngineTarget("10.16.1", "7.5", "Tesla T4", "none", True)
    with pytest.raises(EngineError, match="--hardware-compatible needs a discrete Ampere.*Tesla T4.*7.5"):
        engine_guard.build_target("10.16.1", None, hardware_compatible=True, version_compatible=False)


class _Config:
    def __init__(self, with_api: bool = True) -> None:
        self.flags: list = []
        if with_api:
            self.hardware_compatibility_level = "NONE"
            self.plugins_to_serialize: list = []

    def set_flag(self, flag) -> None:
        self.flags.append(flag)


class _Trt:
    __version__ = "10.16.1"

    class HardwareCompatibilityLevel:
        NONE, AMPERE_PLUS = "NONE", "AMPERE_PLUS"

    class BuilderFlag:
        VERSION_COMPATIBLE = "VERSION_COMPATIBLE"


class _OldTrt:
    __version__ = "8.5.3"

    class BuilderFlag:
        FP16 = "FP16"


def test_apply_compatibility_sets_what_tensorrt_offers(tmp_path: Path) -> None:
    both = EngineTarget("10.16.1", "8.6", "x", "ampere_plus", True)
    class Parser:
        def get_used_vc_plugin_libraries(self) -> list[str]:
            return ["libnvinfer_vc_plugin.so.10"]  # what the parser used for RoiAlign

    cfg = _Config()
    trt_build.apply_compatibility(_Trt, cfg, both, tmp_path / "libsepsnet_plugins.so", Parser())
    assert cfg.hardware_compatibility_level == "AMPERE_PLUS" and cfg.flags == ["VERSION_COMPATIBLE"]
    assert cfg.plugins_to_serialize == [str(tmp_path / "libsepsnet_plugins.so"), "libnvinfer_vc_plugin.so.10"]
    plain = _Config()
    trt_build.apply_compatibility(_Trt, plain, EngineTarget("10.16.1", "8.6", "x"), None)
    assert plain.hardware_compatibility_level == "NONE" and plain.flags == []
    with pytest.raises(EngineError, match="no hardware-compatible"):
        trt_build.apply_compatibility(_OldTrt, _Config(False), EngineTarget("8.5.3", "8.6", "x", "ampere_plus"), None)
    with pytest.raises(EngineError, match="no version-compatible"):
        trt_build.apply_compatibility(_OldTrt, _Config(False), EngineTarget("8.5.3", "8.6", "x", "none", True), None)


def test_bundle_with_plans_is_guarded_on_load(tmp_path: Path) -> None:
    """verify_bundle(runtime=...) applies the guard to a real bundle; ONNX Runtime use ignores the plans."""
    from sepsnet.export import bundle

    engine = _manifest()["engine"]
    root = _make_bundle(tmp_path / "b", plans=True, trt="10.3.0", gpu=engine["gpu"], engine=engine)
    assert bundle.has_plans(bundle.verify_bundle(root))
    assert bundle.verify_bundle(root, runtime=RTX3090)["engine"]["compute_capability"] == "8.6"
    with pytest.raises(BundleError, match=r"compute capability 8\.6.*found Tesla T4"):
        bundle.verify_bundle(root, runtime=Runtime("10.3.0", "7.5", "Tesla T4", 0))
    data = json.loads((root / "manifest.json").read_text())
    data["engine"]["hardware_compatibility"] = "sm_everything"
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="'engine.hardware_compatibility'"):
        bundle.verify_bundle(root)


@pytest.mark.skipif(trt_build.trt_version() is not None, reason="checks the refusal where TensorRT is missing")
def test_from_bundle_trt_backend_refused_by_the_guard(tmp_path: Path) -> None:
    from sepsnet.engines.predictor import PanopticPredictor

    engine = _manifest()["engine"]
    root = _make_bundle(tmp_path / "b", plans=True, trt="10.3.0", gpu=engine["gpu"], engine=engine)
    with pytest.raises(BundleError, match="need TensorRT 10.3.0.*no importable tensorrt"):
        PanopticPredictor.from_bundle(root, backend="trt")
