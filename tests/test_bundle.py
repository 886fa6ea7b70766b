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


def _make_bundle(root: Path, *, plans: bool = False, trt: str | None = None, gpu: str | None = None,
                 engine: dict | None = None) -> Path:
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
    content["engine"] = engine
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


# ---------------------------------------------------------------- the manifest schema (issue 16 item 5)
def _edit(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


ABSOLUTE = str(Path(__file__).resolve().parent / "dense.onnx")  # any absolute path; never read


def _set(path: str | tuple, value):
    def change(data: dict) -> None:
        *parents, last = path.split(".") if isinstance(path, str) else path
        for p in parents:
            data = data[p]
        data[last] = value
    return change


def _del(path: str):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            data = data[p]
        del data[last]
    return change


BAD_MANIFESTS = [  # (edit, the key the error must name)
    (_del("input"), "'input' is missing"),
    (_del("config"), "'config' is missing"),
    (_del("classes.stuff"), "'classes.stuff' is missing"),
    (_del("model.num_bases"), "'model.num_bases' is missing"),
    (_del("postprocess.alpha"), "'postprocess.alpha' is missing"),
    (_del("graphs.instance"), "'graphs.instance' is missing"),
    (_del("graphs.dense.onnx"), "'graphs.dense.onnx' is missing"),
    (_set("postprocess.fancy_thresh", 0.3), "'postprocess.fancy_thresh' is not a known key"),
    (_set("enigne", None), "'enigne' is not a known key"),
    (_set("input.height", -64), "'input.height'"),
    (_set("input.height", "64"), "'input.height'"),
    (_set("input.pixel_std", [58.0, 0.0, 57.0]), "'input.pixel_std[1]'"),
    (_set("input.ranges.width", [96, 128, 96]), "'input.ranges.width'"),
    (_set("input.ranges.batch", [1, 1]), "'input.ranges.batch'"),
    (_set("instances.min", 500), "'instances'"),
    (_set("precision", "int4"), "'precision'"),
    (_set("opset", 17.5), "'opset'"),
    (_set("alpha", 0.5), "'alpha'"),
    (_set("postprocess.score_thresh", 2.0), "postprocess.score_thresh"),
    (_set("postprocess.max_instances", "many"), "'postprocess.max_instances'"),
    (_set("config.model.num_bases", "four"), "config"),
    (_set("classes.things", [{"name": "car"}]), "'classes.things[0].id' is missing"),
    (_set("graphs.dense.plan", 5), "'graphs.dense.plan'"),
    (_set("graphs.dense.onnx", "../../other/dense.onnx"), "'graphs.dense.onnx': '../../other/dense.onnx'"),
    (_set("graphs.dense.engine_onnx", ABSOLUTE), f"'graphs.dense.engine_onnx': '{ABSOLUTE}'"),
    (_set("plugin", "..\\lib.so"), "'plugin'"),
    (_set(("files", "sub/../../x.onnx"), {"sha256": "0" * 64, "bytes": 1}), "'files.sub/../../x.onnx'"),
    (_set(("files", "dense.onnx"), {"sha256": "not-hex", "bytes": 1}), "'files.dense.onnx.sha256'"),
    (_set("engine", {"tensorrt": "10.3", "compute_capability": "Orin"}), "'engine"),
]


@pytest.mark.parametrize("change,key", BAD_MANIFESTS, ids=[k for _, k in BAD_MANIFESTS])
def test_bad_manifest_names_the_key(tmp_path: Path, change, key: str) -> None:
    root = _make_bundle(tmp_path / "b")
    _edit(root, change)
    with pytest.raises(BundleError) as err:
        bundle.verify_bundle(root)
    msg = str(err.value)
    assert key in msg and "manifest.json" in msg and "\n" not in msg, msg


def test_truncated_or_non_object_manifest(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="unreadable manifest"):
        bundle.verify_bundle(root)
    (root / "manifest.json").write_text(text.replace('"alpha": 0.8', '"alpha": NaN'))
    with pytest.raises(BundleError, match="non-finite number NaN"):
        bundle.verify_bundle(root)
    (root / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="must be a JSON object, got list"):
        bundle.verify_bundle(root)


def test_symlinked_file_leading_outside_is_refused(tmp_path: Path) -> None:
    root = _make_bundle(tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    (root / "dense.onnx").rename(outside)
    (root / "dense.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="'dense.onnx'.*outside the bundle"):
        bundle.verify_bundle(root)


def test_valid_manifest_passes_schema_and_old_key_order(tmp_path: Path) -> None:
    """The manifest sepsnet writes passes; optional keys (preselect, engine, engine_onnx_trt10) may be absent."""
    root = _make_bundle(tmp_path / "b")
    _edit(root, lambda d: (d.pop("preselect"), d.pop("engine")))
    assert bundle.verify_bundle(root)["precision"] == "fp16"


def test_from_bundle_and_bench_report_the_key(tmp_path: Path, capsys) -> None:
    """The runtime entry points give the same one-line BundleError (no KeyError/TypeError)."""
    from sepsnet.cli.bench import main as bench_main
    from sepsnet.engines.predictor import PanopticPredictor

    root = _make_bundle(tmp_path / "b")
    _edit(root, _set("postprocess.unknown_knob", 1))
    with pytest.raises(BundleError, match="'postprocess.unknown_knob' is not a known key"):
        PanopticPredictor.from_bundle(root, backend="ort")
    assert bench_main([str(root), "--iters", "1", "--warmup", "0", "--backend", "ort"]) == 2
    err = capsys.readouterr().err
    assert "'postprocess.unknown_knob' is not a known key" in err and "Traceback" not in err
    _edit(root, _del("input"))
    assert bench_main([str(root / "manifest.json"), "--iters", "1", "--backend", "ort"]) == 2
    assert "'input' is missing" in capsys.readouterr().err
