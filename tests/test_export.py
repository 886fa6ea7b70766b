"""Export of the tiny model: strip proof, ONNX checks, ORT == PyTorch deploy, fp16/int8 graphs,
TensorRT guards and the sepsnet-export CLI end to end."""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from sepsnet.cli.export import EXIT_NEEDS_TRT
from sepsnet.cli.export import main as export_main
from sepsnet.errors import EngineError
from sepsnet.export import bundle, calibration, onnx_export, precision, strip, surgery, trt_build
from sepsnet.model.weights import checkpoint_config, load_checkpoint
from sepsnet.postprocess.candidates import level_entries, select_candidates

from _compare import match_detections, match_rows

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 96


def _trt_and_gpu() -> str | None:
    """None when TensorRT engines can be built here, else the reason."""
    try:
        trt_build.check_environment()
    except EngineError as exc:
        return str(exc).split(". ")[0]
    return None


NO_TRT = _trt_and_gpu()


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def deploy(ckpt: Path):
    data = load_checkpoint(ckpt)
    cfg = checkpoint_config(data)
    model, aux = strip.build_deploy_model(cfg, data["model"])
    return cfg, model, aux, data["model"]


@pytest.fixture(scope="module")
def fp16_bundle(ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """CLI run with --fp16: writes the fp32 + fp16 graphs; exits non-zero where TensorRT is missing."""
    out = tmp_path_factory.mktemp("bundle_fp16")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = export_main([str(ckpt), "--out", str(out), "--fp16", "--height", str(H), "--width", str(W)])
    return out, rc, err.getvalue()


def test_strip_removes_aux(deploy) -> None:
    cfg, model, aux, state = deploy
    assert aux.modules, "the tiny config has every train-only component on"
    names = {n for n, _ in model.named_parameters()}
    assert not [n for n in names if any(n.startswith(m + ".") for m in aux.modules)]
    assert aux.fingerprints and all(t in state for t in aux.tensor_names)


def test_graphs_clean_and_free_of_aux(fp16_bundle, deploy) -> None:
    out, _, _ = fp16_bundle
    cfg, _, aux, state = deploy
    for name in ("dense.onnx", "instance.onnx"):
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model, full_check=True)
        strip.assert_no_aux_weights(model, aux, name)
    inst = onnx.load(str(out / "instance.onnx"))
    nodes = surgery.roi_align_nodes(inst)
    assert nodes and all(n["coordinate_transformation_mode"] == b"half_pixel" and
                         n["sampling_ratio"] == cfg.model.blender.sampling_ratio for n in nodes)
    dims = surgery.dim_names(inst)
    assert isinstance(dims["rois"][0], str) and dims["rois"][0] == dims["attention"][0]
    assert surgery.dim_names(onnx.load(str(out / "dense.onnx")))["image"] == [1, 3, H, W]
    # the proof can fail: plant one aux weight (by value, under an innocent name) into the graph
    planted = copy.deepcopy(inst)
    aux_name = next(n for n in aux.tensor_names if state[n].numel() >= strip.MIN_FINGERPRINT_NUMEL
                    and bool((state[n] != state[n].flatten()[0]).any()))
    planted.graph.initializer.append(numpy_helper.from_array(state[aux_name].numpy(), "innocent"))
    with pytest.raises(EngineError, match=aux_name.replace(".", r"\.")):
        strip.assert_no_aux_weights(planted, aux, "planted")


def test_dense_ort_equals_torch(fp16_bundle, deploy) -> None:
    out, _, _ = fp16_bundle
    _, model, _, _ = deploy
    cfg = deploy[0]
    image = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_dense(image, onnx_export.dense_preselect(cfg))
    got = _session(out / "dense.onnx").run(list(onnx_export.DENSE_OUTPUTS), {"image": image.numpy()})
    got = dict(zip(onnx_export.DENSE_OUTPUTS, (torch.from_numpy(v) for v in got)))
    # locations that tie in the pre-selection rank (all below the threshold here) may come in another
    # order from ONNX Runtime's TopK than from torch.topk: pair the rows of each level one-to-one
    counts = level_entries(ref["p3"].shape[-2:], {"topk": cfg.postprocess.pre_nms_topk, "score_thresh": 0})
    got, ref = _paired_by_level(got, ref, counts)
    for name in onnx_export.DENSE_OUTPUTS:
        torch.testing.assert_close(got[name], ref[name], atol=1e-4, rtol=1e-5, msg=name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preselect"] == {"topk": cfg.postprocess.pre_nms_topk,
                                     "score_thresh": cfg.postprocess.score_thresh, "padded": False}


PER_LOCATION = ("boxes", "scores", "centerness", "attention")


def _paired_by_level(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                     counts: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-location outputs of image 0 with the rows of each level paired one-to-one (Hungarian on
    all per-location values), so the comparison does not depend on the order of ties."""
    idx_got, idx_ref, start = [], [], 0
    for c in counts:
        rows = [torch.cat([d[k][0, start:start + c].reshape(c, -1) for k in PER_LOCATION], 1) for d in (got, ref)]
        ia, ib = match_rows(*rows)
        idx_got.append(start + ia)
        idx_ref.append(start + ib)
        start += c
    ig, ir = torch.cat(idx_got), torch.cat(idx_ref)
    got, ref = dict(got), dict(ref)
    for k in PER_LOCATION:
        got[k], ref[k] = got[k][:, ig], ref[k][:, ir]
    return got, ref


@pytest.mark.parametrize("dynamic", [False, True])
def test_dense_preselect_graph_keeps_the_fcos_candidates(deploy, tmp_path: Path, dynamic: bool) -> None:
    """A pre-selecting dense graph that really truncates (top 7 per level, every location above the
    threshold) gives the candidates FCOS selects from every location of the eager model."""
    from dataclasses import replace

    cfg, model, _, _ = deploy
    pp = replace(cfg.postprocess, pre_nms_topk=7, score_thresh=0.001, nms_thresh=0.9, max_instances=300)
    cfg_pp = replace(cfg, postprocess=pp)
    sel = onnx_export.dense_preselect(cfg_pp, dynamic)
    shape = onnx_export.default_shape(cfg, H, W, dynamic=dynamic, max_batch=2)
    proto = onnx_export.export_dense(model, cfg_pp, tmp_path / "dense.onnx", shape, preselect=sel)
    assert surgery.assert_constant_topk(proto, "dense") == 5
    init = {i.name for i in proto.graph.initializer}
    computed_clip = [n.name for n in proto.graph.node
                     if n.op_type == "Clip" and any(i and i not in init for i in n.input[1:])]
    assert not computed_clip  # older TensorRT parsers take only constant Clip bounds
    sess = _session(tmp_path / "dense.onnx")
    for h, w in ((H, W), (96, 128)) if dynamic else ((H, W),):
        image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        with torch.no_grad():
            full = model.forward_dense(image)
        outs = sess.run(list(onnx_export.DENSE_OUTPUTS), {"image": image.numpy()})
        got = dict(zip(onnx_export.DENSE_OUTPUTS, (torch.from_numpy(v) for v in outs)))
        p3 = full["p3"].shape[-2:]
        counts = level_entries(p3, {"topk": 7, "score_thresh": 0.001, "padded": dynamic})
        assert got["attention"].shape[1] == sum(counts) < full["attention"].shape[1]
        (a,) = select_candidates(got["boxes"], got["scores"], got["centerness"], got["attention"], counts, pp,
                                 [(h, w)])
        (b,) = select_candidates(full["boxes"], full["scores"], full["centerness"], full["attention"],
                                 level_entries(p3), pp, [(h, w)])
        # near-equal ORT and eager scores may order (and at the top-k / threshold margin, keep)
        # candidates differently: pair them by class and box, then compare the pairs
        ia, ib = match_detections(a.boxes, a.classes, b.boxes, b.classes, max_box_l1=4e-3)
        assert len(b) >= 10 and len(ia) >= len(b) - 1 and len(ia) >= len(a) - 1
        unpaired = [float(s) for i, s in enumerate(a.scores) if i not in ia] + [
            float(s) for i, s in enumerate(b.scores) if i not in ib]
        assert all(s < float(b.scores[ib].min()) + 1e-3 for s in unpaired), unpaired  # only at the margin
        torch.testing.assert_close(a.scores[ia], b.scores[ib], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(a.boxes[ia], b.boxes[ib], atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(a.attention[ia], b.attention[ib], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 23])
def test_instance_ort_equals_torch(fp16_bundle, deploy, n: int) -> None:
    out, _, _ = fp16_bundle
    cfg, model, _, _ = deploy
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        dense = model.forward_dense(torch.randn(1, 3, H, W, generator=g))
        rois = onnx_export.example_rois(n, 1, H, W, g)
        attention = torch.randn(n, dense["attention"].shape[2], generator=g)
        ref = model.forward_instances(dense["bases"], dense["p3"], rois, attention)
    names = onnx_export.instance_output_names(cfg)
    feeds = {"bases": dense["bases"].numpy(), "p3": dense["p3"].numpy(), "rois": rois.numpy(),
             "attention": attention.numpy()}
    got = _session(out / "instance.onnx").run(list(names), feeds)
    R = cfg.model.blender.mask_size
    assert got[0].shape == (n, R, R)
    for name, value in zip(names, got):
        torch.testing.assert_close(torch.from_numpy(value), ref[name], atol=1e-4, rtol=0, msg=name)


def test_fp16_graph_runs_and_is_close(fp16_bundle, deploy) -> None:
    """fp16 tolerance: |ort_fp16 - torch_fp32| <= 1e-2 * max(1, max|torch|) per output."""
    out, _, _ = fp16_bundle
    cfg, model, _, _ = deploy
    g16 = onnx.load(str(out / "dense.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in g16.graph.initializer)
    assert [i.type.tensor_type.elem_type for i in g16.graph.input] == [onnx.TensorProto.FLOAT]
    image = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.forward_dense(image)
        rois = onnx_export.example_rois(5, 1, H, W, torch.Generator().manual_seed(3))
        inst_ref = model.forward_instances(ref["bases"], ref["p3"], rois, ref["attention"][0, :5])
    got = _session(out / "dense.fp16.onnx").run(list(onnx_export.DENSE_OUTPUTS), {"image": image.numpy()})
    for name, value in zip(onnx_export.DENSE_OUTPUTS, got):
        tol = 1e-2 * max(1.0, float(ref[name].abs().max()))
        assert float(np.abs(value - ref[name].numpy()).max()) <= tol, name
    names = onnx_export.instance_output_names(cfg)
    feeds = {"bases": ref["bases"].numpy(), "p3": ref["p3"].numpy(), "rois": rois.numpy(),
             "attention": ref["attention"][0, :5].numpy()}
    for name, value in zip(names, _session(out / "instance.fp16.onnx").run(list(names), feeds)):
        assert float(np.abs(value - inst_ref[name].numpy()).max()) <= 1e-2, name


def _calib_inputs(deploy, count: int = 2) -> list[np.ndarray]:
    return calibration.calibration_inputs(calibration.SYNTHETIC, deploy[0].data, (H, W), count)


def test_int8_qdq_graph(fp16_bundle, deploy, tmp_path: Path) -> None:
    out, _, _ = fp16_bundle
    batches = _calib_inputs(deploy)
    q = calibration.to_int8_qdq(out / "dense.onnx", tmp_path / "dense.int8.onnx", batches)
    counts = precision.count_ops(q, "QuantizeLinear", "DequantizeLinear", "Conv")
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] >= counts["QuantizeLinear"]
    got = _session(tmp_path / "dense.int8.onnx").run(None, {"image": batches[0]})
    ref = _session(out / "dense.onnx").run(None, {"image": batches[0]})
    assert [a.shape for a in got] == [b.shape for b in ref]
    assert all(np.isfinite(a).all() for a in got)
    # quantization changes values, but scores stay probabilities near the fp32 ones
    assert float(np.abs(got[1] - ref[1]).max()) < 0.25


def test_dynamic_export(deploy, tmp_path: Path) -> None:
    cfg, model, _, _ = deploy
    shape = onnx_export.default_shape(cfg, H, W, dynamic=True, max_batch=2)
    onnx_export.export_dense(model, cfg, tmp_path / "dense.onnx", shape)
    inst = onnx_export.export_instance(model, cfg, tmp_path / "instance.onnx", shape)
    dims = surgery.dim_names(onnx.load(str(tmp_path / "dense.onnx")))["image"]
    assert [isinstance(d, str) for d in dims] == [True, False, True, True]
    assert all(isinstance(d, str) for i in (0, 2, 3) for d in [surgery.dim_names(inst)["bases"][i]])
    sess = _session(tmp_path / "dense.onnx")
    for b, h, w in ((1, 96, 64), (2, 64, 128)):
        image = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model.forward_dense(image)
        got = sess.run(["boxes", "bases"], {"image": image.numpy()})
        torch.testing.assert_close(torch.from_numpy(got[0]), ref["boxes"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got[1]), ref["bases"], atol=1e-4, rtol=1e-5)
    # the dynamic instance graph at another feature size and batch, 4 instances
    names = onnx_export.instance_output_names(cfg)
    rois = onnx_export.example_rois(4, 2, 64, 128, torch.Generator().manual_seed(4))
    attention = torch.randn(4, ref["attention"].shape[2])
    with torch.no_grad():
        inst_ref = model.forward_instances(ref["bases"], ref["p3"], rois, attention)
    feeds = {"bases": ref["bases"].numpy(), "p3": ref["p3"].numpy(), "rois": rois.numpy(),
             "attention": attention.numpy()}
    for name, value in zip(names, _session(tmp_path / "instance.onnx").run(list(names), feeds)):
        torch.testing.assert_close(torch.from_numpy(value), inst_ref[name], atol=1e-4, rtol=0, msg=name)


def test_cli_onnx_only(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    assert export_main([str(ckpt), "--out", str(out), "--onnx-only", "--height", str(H), "--width", str(W)]) == 0
    m = bundle.verify_bundle(out)
    assert m["precision"] == "fp32" and m["opset"] >= 17
    assert m["input"]["height"] == H and m["input"]["width"] == W and m["input"]["dynamic"] is False
    assert set(m["files"]) == {"dense.onnx", "instance.onnx"}
    specs = {s["name"]: s for s in m["graphs"]["instance"]["inputs"]}
    assert specs["rois"]["shape"][1] == 5 and isinstance(specs["rois"]["shape"][0], str)
    assert [s["name"] for s in m["graphs"]["dense"]["outputs"]] == list(onnx_export.DENSE_OUTPUTS)
    if NO_TRT is None:
        return
    # later, on the target: --from-onnx converts to fp16 and stops at the missing TensorRT, bundle intact,
    # with the same exit code as the checkpoint path
    rc = export_main(["--from-onnx", str(out), "--fp16"])
    assert rc == EXIT_NEEDS_TRT and "tensorrt" in capsys.readouterr().err.lower()
    m = bundle.verify_bundle(out)
    assert m["precision"] == "fp16" and m["graphs"]["dense"]["engine_onnx"] == "dense.fp16.onnx"
    assert "dense.fp16.onnx" in m["files"] and not bundle.has_plans(m)


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a GPU are available here")
def test_cli_fp16_without_tensorrt(fp16_bundle) -> None:
    out, rc, err = fp16_bundle
    assert rc == EXIT_NEEDS_TRT == 3
    assert "TensorRT + an NVIDIA GPU" in err and f"sepsnet-export --from-onnx {out} --fp16" in err
    m = bundle.verify_bundle(out)  # the ONNX bundle is complete and valid
    assert m["precision"] == "fp16" and m["graphs"]["dense"]["engine_onnx"] == "dense.fp16.onnx"
    assert not bundle.has_plans(m)
    with pytest.raises(EngineError, match="tensorrt|CUDA GPU"):
        trt_build.build_engine(out / "dense.onnx", out / "dense.plan")


def test_cli_errors(ckpt: Path, tmp_path: Path, capsys) -> None:
    assert export_main([str(ckpt), "--out", str(tmp_path / "x"), "--height", "50", "--width", "64"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.pth"), "--out", str(tmp_path / "y")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert export_main(["--from-onnx", str(tmp_path / "nothing")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT engine build needs tensorrt + GPU: {NO_TRT}")
def test_trt_build_from_onnx(fp16_bundle) -> None:  # pragma: no cover - needs TensorRT + GPU
    out, rc, _ = fp16_bundle
    assert rc == 0
    from sepsnet.export.engine_guard import current_runtime

    m = bundle.verify_bundle(out, runtime=current_runtime())
    assert m["graphs"]["dense"]["plan"] == "dense.plan" and m["gpu"]
    assert m["engine"]["tensorrt"] == trt_build.trt_version() and m["engine"]["hardware_compatibility"] == "none"


@pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT runtime needs tensorrt + GPU: {NO_TRT}")
def test_trt_backend_matches_ort(fp16_bundle) -> None:  # pragma: no cover - needs TensorRT + GPU
    """Static dense engine: plain launches and CUDA graph replays both track ONNX Runtime (fp16 tolerance),
    and a second frame through the graph is not a stale copy of the first."""
    from sepsnet.engines.trt_backend import TrtBackend

    out, _, _ = fp16_bundle
    sess = _session(out / "dense.onnx")
    names = [o.name for o in sess.get_outputs()]
    plain = TrtBackend(out / "dense.plan")
    graphed = TrtBackend(out / "dense.plan", cuda_graph=True)
    for seed in (0, 1):
        image = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(seed))
        ref = dict(zip(names, sess.run(None, {"image": image.numpy()})))
        for backend in (plain, graphed):
            got = backend.run({"image": image})
            for name in ("stuff_logits", "bases"):
                np.testing.assert_allclose(got[name].cpu().numpy(), ref[name], atol=5e-2, rtol=5e-2)
    assert graphed.cuda_graph and graphed._graph is not None


def test_roi_align_fix_writes_missing_attributes() -> None:
    """An exporter that omits sampling_ratio / uses output_half_pixel / int32 indices gets fixed."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8]),
              helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["n", 4]),
              helper.make_tensor_value_info("idx", TensorProto.INT32, ["n"])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 3, 3])
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=3, output_width=3,
                            coordinate_transformation_mode="output_half_pixel")
    model = helper.make_model(helper.make_graph([node], "g", inputs, [out]),
                              opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(EngineError, match="output_half_pixel"):
        surgery.assert_roi_align(model, 1, "raw")
    fixed = surgery.clean_graph(model, sampling_ratio=1)
    surgery.assert_roi_align(fixed, 1, "fixed")
    (attrs,) = surgery.roi_align_nodes(fixed)
    assert attrs["sampling_ratio"] == 1 and attrs["coordinate_transformation_mode"] == b"half_pixel"
    cast = [n for n in fixed.graph.node if n.op_type == "Cast"]
    assert len(cast) == 1 and cast[0].attribute[0].i == TensorProto.INT64
    x = np.arange(128, dtype=np.float32).reshape(1, 2, 8, 8)
    y = _session_bytes(fixed).run(None, {"x": x, "rois": np.array([[0, 0, 4, 4]], np.float32),
                                         "idx": np.zeros(1, np.int32)})[0]
    assert y.shape == (1, 2, 3, 3)


def _session_bytes(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _plugin_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The graph's only custom-domain node, which must be SEPSNetRoiBlend."""
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert [n.op_type for n in custom] == [trt_build.PLUGIN_OP]
    return custom[0]


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.value_info)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _assert_plugin_graphs(out: Path, cfg, fp16: bool) -> None:
    """instance.plugin.onnx (fp32, TensorRT 10) and, for fp16, instance.plugin.fp16.onnx (TensorRT 11): one
    SEPSNetRoiBlend node with the config's blender attributes; in fp16 it is fed fp32 bases/boxes/attention and
    int64 indices (a plugin type combo) while the rest of the graph is fp16."""
    b = cfg.model.blender
    for name in ("instance.plugin.onnx",) + (("instance.plugin.fp16.onnx",) if fp16 else ()):
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model)
        node = _plugin_node(model)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["out_size"] == b.mask_size == 56 and attrs["sampling_ratio"] == b.sampling_ratio
        assert attrs["num_bases"] == b.num_bases and attrs["spatial_scale"] == pytest.approx(0.25)
        assert attrs["plugin_version"] == b"1" and "Softmax" not in {n.op_type for n in model.graph.node}
        types = _tensor_types(model)
        f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
        assert [types.get(t) for t in node.input] == [f32, f32, i64, f32], name
        if name.endswith(".fp16.onnx"):
            assert onnx.TensorProto.FLOAT16 in types.values()
            assert [types.get(t) for t in node.input[1:3]] == [f32, i64]


def test_cli_plugin_graph(ckpt: Path, deploy, tmp_path: Path) -> None:
    """--fp16 --plugin --onnx-only: the fp32 instance graph is fused first, then converted to fp16 (fp16 first
    used to split the blend pattern with Casts and fail); both plugin graphs are in the bundle."""
    cfg = deploy[0]
    out = tmp_path / "bundle"
    rc = export_main([str(ckpt), "--out", str(out), "--onnx-only", "--fp16", "--plugin", "--height", str(H),
                      "--width", str(W)])
    assert rc == 0
    m = bundle.verify_bundle(out)
    assert set(m["files"]) == {"dense.onnx", "instance.onnx", "dense.fp16.onnx", "instance.plugin.onnx",
                               "instance.plugin.fp16.onnx"}
    inst, dense = m["graphs"]["instance"], m["graphs"]["dense"]
    assert (inst["engine_onnx"], inst["engine_onnx_trt10"]) == ("instance.plugin.fp16.onnx", "instance.plugin.onnx")
    assert (dense["engine_onnx"], dense["engine_onnx_trt10"]) == ("dense.fp16.onnx", "dense.onnx")
    assert trt_build.engine_onnx_for(inst, 10) == "instance.plugin.onnx"
    assert trt_build.engine_onnx_for(inst, 11) == "instance.plugin.fp16.onnx"
    _assert_plugin_graphs(out, cfg, fp16=True)


def test_cli_strip_proof_covers_variant_graphs(ckpt: Path, deploy, tmp_path: Path, monkeypatch, capsys) -> None:
    """The aux-weight proof runs on every graph written to the bundle, not only dense/instance.onnx: an aux
    weight planted into the plugin graph (by value, innocent name) fails the export."""
    from sepsnet.export import plugin_rewrite

    _, _, aux, state = deploy
    aux_name = next(n for n in aux.tensor_names if state[n].numel() >= strip.MIN_FINGERPRINT_NUMEL
                    and bool((state[n] != state[n].flatten()[0]).any()))
    real = plugin_rewrite.rewrite_roi_blend

    def planted(model, *a, **k):
        fused, count = real(model, *a, **k)
        fused.graph.initializer.append(numpy_helper.from_array(state[aux_name].numpy(), "innocent"))
        return fused, count

    monkeypatch.setattr(plugin_rewrite, "rewrite_roi_blend", planted)
    out = tmp_path / "bundle"
    rc = export_main([str(ckpt), "--out", str(out), "--onnx-only", "--plugin", "--height", str(H), "--width", str(W)])
    err = capsys.readouterr().err
    assert rc == 2 and "instance.plugin.onnx" in err and aux_name in err, err
    assert not (out / bundle.MANIFEST).exists()


@pytest.mark.skipif(NO_TRT is None, reason="exercises --from-onnx where TensorRT is missing")
def test_cli_from_onnx_rewrites_plugin_and_int8(fp16_bundle, deploy, tmp_path: Path, capsys) -> None:
    """--from-onnx DIR --out EMPTY --plugin: copied (an existing empty folder is fine), the plugin graphs written
    for the bundle's precision, exit EXIT_NEEDS_TRT; then --int8 keeps the plugin and writes the TensorRT 11
    Q/DQ graph over the fp16 graph; a non-empty foreign --out is refused."""
    src, _, _ = fp16_bundle
    dst = tmp_path / "copy"
    dst.mkdir()
    assert export_main(["--from-onnx", str(src), "--out", str(dst), "--plugin"]) == EXIT_NEEDS_TRT
    assert f"--from-onnx {dst} --fp16" in capsys.readouterr().err
    m = bundle.verify_bundle(dst)
    inst = m["graphs"]["instance"]
    assert m["precision"] == "fp16" and inst["engine_onnx"] == "instance.plugin.fp16.onnx"
    _assert_plugin_graphs(dst, deploy[0], fp16=True)
    assert bundle.verify_bundle(src)["graphs"]["instance"]["engine_onnx"] == "instance.fp16.onnx"  # untouched
    # the same copy again is accepted (e.g. re-run on the target); then int8, plugin kept
    assert export_main(["--from-onnx", str(src), "--out", str(dst)]) == EXIT_NEEDS_TRT
    args = ["--from-onnx", str(dst), "--int8", "--plugin", "--calib", "synthetic", "--calib-count", "2"]
    assert export_main(args) == EXIT_NEEDS_TRT
    m = bundle.verify_bundle(dst)
    dense, inst = m["graphs"]["dense"], m["graphs"]["instance"]
    assert m["precision"] == "int8"
    assert (dense["engine_onnx"], dense["engine_onnx_trt10"]) == ("dense.fp16.int8.onnx", "dense.int8.onnx")
    assert inst["engine_onnx"] == inst["engine_onnx_trt10"] == "instance.plugin.onnx"
    assert not {"dense.fp16.onnx", "instance.fp16.onnx", "instance.plugin.fp16.onnx"} & set(m["files"])
    q = onnx.load(str(dst / "dense.fp16.int8.onnx"))
    assert precision.count_ops(q, "QuantizeLinear")["QuantizeLinear"] > 0 and precision.is_fp16_graph(q)
    capsys.readouterr()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a bundle")
    assert export_main(["--from-onnx", str(src), "--out", str(junk)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and (junk / "notes.txt").is_file()


def test_int8_qdq_over_fp16_graph(fp16_bundle, deploy, tmp_path: Path) -> None:
    """TensorRT 11 int8 graph: Q/DQ over the fp16 graph (opset 19, fp16 scales, no fp32 weights left), so the
    unquantized layers run in fp16 on a strongly typed network; it runs in ORT CPU close to the fp32 graph."""
    out, _, _ = fp16_bundle
    batches = _calib_inputs(deploy)
    q = calibration.to_int8_qdq(out / "dense.fp16.onnx", tmp_path / "dense.fp16.int8.onnx", batches)
    onnx.checker.check_model(q)
    counts = precision.count_ops(q, "QuantizeLinear", "DequantizeLinear")
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] >= counts["QuantizeLinear"]
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= calibration.QDQ_FP16_OPSET
    kinds = {i.data_type for i in q.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.INT8 in kinds and onnx.TensorProto.FLOAT not in kinds
    assert not [n for n in q.graph.node if n.domain not in ("", "ai.onnx")]  # no ORT-only ops baked in
    got = _session(tmp_path / "dense.fp16.int8.onnx").run(None, {"image": batches[0]})
    ref = _session(out / "dense.onnx").run(None, {"image": batches[0]})
    for name, a, b in zip(onnx_export.DENSE_OUTPUTS, got, ref):
        assert a.shape == b.shape and a.dtype == np.float32 and np.isfinite(a).all(), name
        assert float(np.abs(a - b).max()) <= 0.2 * max(1.0, float(np.abs(b).max())), name
    assert float(np.abs(got[1] - ref[1]).max()) < 0.25  # scores, as for the fp32 Q/DQ graph


def test_timing_cache_name(tmp_path: Path) -> None:
    """One timing cache file per TensorRT version and GPU, names safe for any file system."""
    root = str(tmp_path)
    a = trt_build.default_timing_cache("10.3.0", "NVIDIA H200", root=root)
    assert a == tmp_path / "trt_timing_10.3.0_NVIDIA_H200.cache"
    assert trt_build.default_timing_cache("11.0.1", "NVIDIA H200", root=root) != a
    assert trt_build.default_timing_cache("10.3.0", "Orin (nvgpu)", root=root) != a
    odd = trt_build.default_timing_cache("10.3.0", "GeForce RTX 4090/Ti: *x* ", root=root)
    assert odd.parent == tmp_path and odd.name == "trt_timing_10.3.0_GeForce_RTX_4090_Ti_x.cache"
    assert trt_build.default_timing_cache("10.3", "").name == "trt_timing_10.3_unknown.cache"
    assert trt_build.default_timing_cache("10.3", "x").parent == Path.home() / ".cache" / "sepsnet"


class _FakeConfig:
    """IBuilderConfig stand-in: set_timing_cache refuses caches made from a foreign blob."""

    def __init__(self) -> None:
        self.attached: list[bytes] = []

    def create_timing_cache(self, blob: bytes):
        if blob == b"corrupt":
            raise RuntimeError("bad blob")
        return blob

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache == b"foreign":
            return False
        self.attached.append(cache)
        return True


def test_timing_cache_mismatch_starts_fresh(tmp_path: Path) -> None:
    logs: list[str] = []
    path = tmp_path / "t.cache"
    cfg = _FakeConfig()
    trt_build.attach_timing_cache(cfg, path, logs.append)  # no file: a fresh cache, no warning
    assert cfg.attached == [b""] and not logs
    path.write_bytes(b"mine")
    trt_build.attach_timing_cache(cfg, path, logs.append)
    assert cfg.attached[-1] == b"mine" and not logs
    for blob in (b"foreign", b"corrupt"):
        path.write_bytes(blob)
        with pytest.warns(RuntimeWarning, match="starting a fresh one"):
            trt_build.attach_timing_cache(cfg, path, logs.append)
        assert cfg.attached[-1] == b"" and str(path) in logs[-1]


class _Creator:
    def __init__(self, name: str, version: str = "1") -> None:
        self.name, self.plugin_version = name, version


class _Registry:
    def __init__(self, names: list[str], api: bool = True) -> None:
        self.calls: list[tuple] = []
        self._names = names
        if api:
            self.get_creator = self._get
        else:
            self.all_creators = [_Creator(n) for n in names]

    def _get(self, name: str, version: str, namespace: str = ""):
        self.calls.append((name, version, namespace))
        return _Creator(name) if name in self._names else None


def test_has_creator_uses_get_creator_with_fallback() -> None:
    reg = _Registry([trt_build.PLUGIN_OP])
    assert trt_build.has_plugin_creator(reg, trt_build.PLUGIN_OP) and not trt_build.has_plugin_creator(reg, "Other")
    assert reg.calls[0] == (trt_build.PLUGIN_OP, "1", "")
    assert trt_build.has_plugin_creator(_Registry([trt_build.PLUGIN_OP], api=False), trt_build.PLUGIN_OP)
    assert not trt_build.has_plugin_creator(_Registry(["ROIAlign_TRT"], api=False), trt_build.PLUGIN_OP)


def test_plugin_not_found_names_library_and_op(tmp_path: Path) -> None:
    """A library that registers no SEPSNetRoiBlend creator: loaded once through IPluginRegistry.load_library (the
    only registration path; no ctypes dlopen that would register a second time), then a message naming both."""
    lib = tmp_path / "libother_plugins.so"
    lib.write_bytes(b"\x7fELF")

    class Registry(_Registry):
        def __init__(self) -> None:
            super().__init__([])
            self.loaded: list[str] = []

        def load_library(self, path: str) -> object:
            self.loaded.append(path)
            return object()

    class FakeTrt:
        __version__ = "10.3.0"
        registry = Registry()

        @classmethod
        def get_plugin_registry(cls):
            return cls.registry

    with pytest.raises(EngineError) as err:
        trt_build.load_plugin_library(FakeTrt, lib)
    assert str(lib) in str(err.value) and trt_build.PLUGIN_OP in str(err.value) and "10.3.0" in str(err.value)
    assert FakeTrt.registry.loaded == [str(lib.resolve())]
    with pytest.raises(EngineError, match=f"{trt_build.PLUGIN_OP}.*{tmp_path / 'none.so'}.*make plugins"):
        trt_build.load_plugin_library(FakeTrt, tmp_path / "none.so")


def test_plugin_library_registered_once(tmp_path: Path) -> None:
    """load_library is called once per library; a creator already registered is not registered again."""
    lib = tmp_path / "libsepsnet_plugins.so"
    lib.write_bytes(b"\x7fELF")

    class Registry(_Registry):
        def __init__(self) -> None:
            super().__init__([])
            self.loaded: list[str] = []

        def load_library(self, path: str) -> object:
            if self._names:
                raise RuntimeError("plugin creators already registered")  # what TensorRT does on a second load
            self.loaded.append(path)
            self._names.append(trt_build.PLUGIN_OP)
            return object()

    class FakeTrt:
        __version__ = "11.1.0"
        registry = Registry()

        @classmethod
        def get_plugin_registry(cls):
            return cls.registry

    for _ in range(3):
        trt_build.load_plugin_library(FakeTrt, lib)
    assert FakeTrt.registry.loaded == [str(lib.resolve())]


def test_parser_plugin_error_names_library(tmp_path: Path) -> None:
    class Err:
        def node_name(self) -> str:
            return "SEPSNetRoiBlend_0"

        def node_operator(self) -> str:
            return trt_build.PLUGIN_OP

        def desc(self) -> str:
            return "Plugin not found, are the plugin name, version, and namespace correct?"

    class Parser:
        num_errors = 1

        def __init__(self, network, logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return False

        def get_error(self, i: int) -> Err:
            return Err()

    class FakeTrt:
        OnnxParser = Parser

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 1

    class Builder:
        def create_network(self, flags: int) -> object:
            return object()

    lib = tmp_path / "libsepsnet_plugins.so"
    with pytest.raises(EngineError) as err:
        trt_build._parse(FakeTrt, Builder(), tmp_path / "instance.plugin.onnx", None, True, lib)
    text = str(err.value)
    assert "SEPSNetRoiBlend_0" in text and str(lib) in text and "version 1" in text
    with pytest.raises(EngineError, match="no plugin library was loaded"):
        trt_build._parse(FakeTrt, Builder(), tmp_path / "instance.plugin.onnx", None, True, None)


@pytest.mark.skipif(NO_TRT is None, reason="checks the message where TensorRT is missing")
def test_cli_rebuild_hint_keeps_compatibility_flags(fp16_bundle, capsys) -> None:
    """--from-onnx with --hardware-compatible / --version-compatible stops at the missing TensorRT with a rebuild
    command that carries them (every flag of it exists); --fp32 exists; the bundle stays untouched."""
    src, _, _ = fp16_bundle
    before = (src / bundle.MANIFEST).read_bytes()
    rc = export_main(["--from-onnx", str(src), "--hardware-compatible", "--version-compatible"])
    err = capsys.readouterr().err
    assert rc == EXIT_NEEDS_TRT
    assert f"sepsnet-export --from-onnx {src} --fp16 --hardware-compatible --version-compatible" in err
    assert (src / bundle.MANIFEST).read_bytes() == before
    assert export_main(["--from-onnx", str(src), "--fp32", "--calib", "x"]) == 2
    assert "--calib only applies with --int8" in capsys.readouterr().err
