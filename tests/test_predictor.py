"""Runtime: ORT bundle vs eager checkpoint on real photos, bad frames, threads, memory, bench."""
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import load_config, parse_overrides
from sepsnet.data.coco_panoptic import read_rgb
from sepsnet.engines.predictor import FrameRangeWarning, PanopticPredictor, validate_frame
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.model import build_model
from sepsnet.postprocess.preselect import Preselect
from sepsnet.train.checkpoint import save_checkpoint

from _compare import match_detections
from _samples import COCO_IMAGES

ROOT = Path(__file__).parents[1]
PHOTOS = list(COCO_IMAGES)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sepsnet.cli.export import main as export_main

    tmp = tmp_path_factory.mktemp("rt")
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides([
        "data.min_size_test=128", "data.max_size_test=224", "postprocess.score_thresh=0.005",
        "postprocess.instance_score_thresh=0.0", "postprocess.stuff_area_limit=16", "postprocess.max_instances=20",
        "postprocess.pre_nms_topk=60"]))  # < P3/P4 locations: the bundle's pre-selection truncates
    torch.manual_seed(7)
    model = build_model(cfg)
    ckpt = save_checkpoint(tmp / "tiny.pt", model=model, cfg=cfg, iteration=0)
    assert export_main([str(ckpt), "--out", str(tmp / "bundle"), "--onnx-only", "--height", "128",
                        "--width", "224"]) == 0
    return ckpt, tmp / "bundle"


def test_ort_bundle_equals_eager_on_real_photos(artifacts: tuple[Path, Path]) -> None:
    ckpt, bundle = artifacts
    ort_pred = PanopticPredictor.from_bundle(bundle, backend="ort")
    torch_pred = PanopticPredictor.from_checkpoint(ckpt)
    torch_pred.input_hw = ort_pred.input_hw  # same letterboxing as the static bundle
    assert ort_pred.dense.name.startswith("onnxruntime")
    assert ort_pred.preselect == Preselect(topk=60, score_thresh=0.005, padded=False)  # typed, from the manifest
    attention = next(o for o in ort_pred.dense.outputs if o.name == "attention")
    assert attention.shape[1] == 60 + 60 + 28 + 8 + 2  # of 448 + 112 + 28 + 8 + 2 locations at 128x224
    instances = 0
    for photo in PHOTOS:
        rgb = read_rgb(photo)
        a, b = ort_pred(rgb), torch_pred(rgb)
        assert a.id_map.shape == b.id_map.shape == rgb.shape[:2]
        instances += len(b.instance_scores)
        # pair the instances of both backends by class and box: near-equal scores may order them
        # differently, and one at the threshold / max_instances margin may be kept by one backend only
        ia, ib = match_detections(a.instance_boxes, a.instance_classes, b.instance_boxes, b.instance_classes,
                                  max_box_l1=0.05)
        n = max(len(a.instance_scores), len(b.instance_scores))
        assert len(ia) >= n - max(1, n // 20), (len(ia), len(a.instance_scores), len(b.instance_scores))
        assert torch.allclose(a.instance_scores[ia], b.instance_scores[ib], atol=1e-4)
        # identical segmentation up to pixels on a mask's 0.5 threshold
        assert (a.id_map != b.id_map).float().mean() < 0.005
        assert sorted((s["category_id"], s["isthing"]) for s in a.segments_info) == sorted(
            (s["category_id"], s["isthing"]) for s in b.segments_info)
        assert set(a.timings) == {"total"}  # stage timing is opt-in
    ort_pred.timing = True
    from sepsnet.postprocess.timing import FRAME_STAGES

    frame = np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    timed = ort_pred(frame)
    assert set(timed.timings) == {*FRAME_STAGES, "total"}
    ort_pred.timing = False
    assert torch.equal(ort_pred(frame).id_map, timed.id_map)
    assert instances > 0  # the comparison covered the instance engine


@pytest.mark.parametrize("bgr", [False, True])
def test_device_preprocess_equals_opencv(artifacts: tuple[Path, Path], bgr: bool) -> None:
    """The GPU preprocessing path (run here on CPU tensors) matches the OpenCV path: same sizes,
    same padding, pixels within OpenCV's uint8 rounding of the resize."""
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    for photo in PHOTOS:
        frame = read_rgb(photo)
        pred.preprocess_on = "opencv"
        ref, sizes_ref = pred.preprocess(frame, bgr)
        ref = ref.clone()
        pred.preprocess_on = "device"
        got, sizes = pred.preprocess(frame, bgr)
        assert sizes == sizes_ref and got.shape == ref.shape
        (rh, rw), _ = sizes
        assert rh < frame.shape[0]  # the photo was resized, so the interpolation was compared
        diff = (got - ref).abs()
        assert float(diff.max()) < 2.5 / 57.12 and float(diff.mean()) < 0.5 / 57.12
        assert not got[..., rh:, :].any() and not got[..., :, rw:].any()  # padding stays zero


@pytest.mark.parametrize("bad, why", [
    (np.zeros((64, 64, 2), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
    (np.zeros((2, 64, 64, 3), np.uint8), "HxWx3"),
    (np.zeros((0, 64, 3), np.uint8), "empty"),
    (np.full((64, 64, 3), np.nan, np.float32), "NaN"),
    (np.zeros((64, 64, 3), np.int16), "dtype"),
    ("not an image", "numpy"),
])
def test_bad_frame_then_good_frame(artifacts: tuple[Path, Path], bad: object, why: str) -> None:
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    with pytest.raises(FrameError, match=why):
        pred(bad)  # type: ignore[arg-type]
    good = pred(np.full((100, 150, 3), 120, np.uint8))
    assert good.id_map.shape == (100, 150)


@pytest.mark.parametrize("shape", [(96, 128), (96, 128, 1)])
def test_grey_frame_is_the_rgb_frame_with_equal_channels(artifacts: tuple[Path, Path], shape: tuple) -> None:
    """A mono camera's HxW (or HxWx1) frame gives the result of the RGB frame with three equal channels."""
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    grey = np.random.default_rng(1).integers(0, 256, (96, 128), dtype=np.uint8)
    ref = pred(np.repeat(grey[..., None], 3, axis=2))
    got = pred(grey.reshape(shape))
    assert np.array_equal(got.id_map, ref.id_map) and got.segments_info == ref.segments_info


def test_threads_share_a_predictor(artifacts: tuple[Path, Path]) -> None:
    """Two threads calling one predictor get the single-thread result (memory growth over many
    frames is measured by benchmarks/predictor_memory.py, not here)."""
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    frame = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    ref = pred(frame).id_map
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                assert torch.equal(pred(frame).id_map, ref)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_device_path_knob_gives_the_host_path_output(artifacts: tuple[Path, Path]) -> None:
    """``predictor.device_path = True`` runs the fixed-shape post-processing (the CUDA default) on the ORT
    bundle's CPU outputs: the same result, with one host read (the ORT instance engine's I/O aside)."""
    from sepsnet.postprocess.host_reads import HostReadCounter

    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    assert pred.device_path is None
    engine = pred._run_instances
    for photo in PHOTOS[:1]:
        rgb = read_rgb(photo)
        prepared = pred.prepare(rgb)
        dense, _ = pred.run_dense(prepared)
        reads = []
        results = []
        for flag in (False, True):
            pred.device_path = flag
            with HostReadCounter() as counter:
                def run(*args, counter=counter):
                    with counter.paused():
                        return engine(*args)

                pred._run_instances = run
                results.append(pred.finish(prepared, dense))
            reads.append(counter.reads)
        host, device = results
        assert host.num_instances > 0 and reads[1] == 1 and reads[0] > 10, reads
        assert torch.equal(host.id_map, device.id_map) and host.segments_info == device.segments_info
        assert torch.equal(host.instance_scores, device.instance_scores)
        assert torch.equal(host.instance_boxes, device.instance_boxes)
        assert torch.equal(host.instance_masks, device.instance_masks)


def test_bundle_errors(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(BundleError):
        PanopticPredictor.from_bundle(tmp_path)
    with pytest.raises(EngineError, match="unknown backend"):
        PanopticPredictor.from_bundle(artifacts[1], backend="tpu")
    with pytest.raises(BundleError, match="no TensorRT plans"):
        PanopticPredictor.from_bundle(artifacts[1], backend="trt")


def test_trt_backend_needs_tensorrt(tmp_path: Path) -> None:
    from sepsnet.engines.trt_backend import TrtBackend, tensorrt_version

    if tensorrt_version() is not None and torch.cuda.is_available():
        pytest.skip("TensorRT present: covered by the engine build tests")
    with pytest.raises(EngineError, match="TensorRT|GPU"):
        TrtBackend(tmp_path / "x.plan")


def test_bench_cli(artifacts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.bench import main

    ckpt, bundle = artifacts
    for target in (bundle, bundle / "manifest.json", bundle / "instance.onnx", ckpt):
        out = tmp_path / "b.json"
        assert main([str(target), "--iters", "3", "--warmup", "1", "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        assert data["p50_ms"] > 0 and data["fps"] > 0 and data["p99_ms"] >= data["p50_ms"]
        assert "device" in data and "onnxruntime" in data
    assert "p90" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    plan_bundle = tmp_path / "with_plan"  # a .plan means TensorRT: no silent fall-back to ONNX Runtime
    shutil.copytree(bundle, plan_bundle)
    (plan_bundle / "dense.plan").write_bytes(b"not an engine")
    assert main([str(plan_bundle / "dense.plan"), "--iters", "1", "--warmup", "0"]) == 2
    assert "no TensorRT plans" in capsys.readouterr().err


def test_demo_cli(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    from sepsnet.cli.demo import main

    assert main(["--bundle", str(artifacts[1]), "--out", str(tmp_path / "o"), str(PHOTOS[0])]) == 0
    assert (tmp_path / "o" / f"{PHOTOS[0].stem}_overlay.png").is_file()
    doc = json.loads((tmp_path / "o" / "panoptic_predictions.json").read_text())
    assert len(doc["annotations"]) == 1


def test_demo_cli_skips_a_bad_image_and_keeps_the_others(artifacts: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.demo import main

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(PHOTOS[0].read_bytes()[:200])  # a truncated JPEG
    out = tmp_path / "o"
    assert main(["--bundle", str(artifacts[1]), "--out", str(out), str(PHOTOS[0]), str(bad), str(PHOTOS[-1])]) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "1 of 3 images skipped" in err
    doc = json.loads((out / "panoptic_predictions.json").read_text())
    assert sorted(i["file_name"] for i in doc["images"]) == sorted(p.name for p in (PHOTOS[0], PHOTOS[-1]))
    assert not (out / "broken_overlay.png").exists()


def test_demo_cli_from_checkpoint(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    from sepsnet.cli.demo import main

    cfg = ROOT / "configs" / "tiny_synthetic.yaml"
    assert main(["--config", str(cfg), "--checkpoint", str(artifacts[0]), "--out", str(tmp_path / "o"),
                 str(PHOTOS[-1])]) == 0
    assert (tmp_path / "o" / f"{PHOTOS[-1].stem}_overlay.png").is_file()
    doc = json.loads((tmp_path / "o" / "panoptic_predictions.json").read_text())
    assert [a["file_name"] for a in doc["annotations"]] and (tmp_path / "o").rglob("*.png")
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"), str(PHOTOS[0])]) == 2


def _tiny_onnx(path: Path, inputs: dict, outputs: dict, nodes: list) -> Path:
    """A hand-made ONNX graph (fast to load and run) with named, possibly dynamic, dims."""
    import onnx
    from onnx import TensorProto, helper

    types = {"float": TensorProto.FLOAT, "int32": TensorProto.INT32, "int64": TensorProto.INT64}
    graph = helper.make_graph(
        [helper.make_node(*n[:3], **(n[3] if len(n) > 3 else {})) for n in nodes], "tiny",
        [helper.make_tensor_value_info(k, types[t], shape) for k, (t, shape) in inputs.items()],
        [helper.make_tensor_value_info(k, types[t], shape) for k, (t, shape) in outputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _add_cast_graph(path: Path) -> Path:
    from onnx import TensorProto

    return _tiny_onnx(path, {"a": ("float", ["n", 3]), "b": ("float", ["n", 3]), "i": ("int32", ["n"])},
                      {"c": ("float", ["n", 3]), "j": ("float", ["n"])},
                      [("Add", ["a", "b"], ["c"]), ("Cast", ["i"], ["j"], {"to": TensorProto.FLOAT})])


def test_ort_missing_feed_names_it_and_the_expected_inputs(tmp_path: Path) -> None:
    from sepsnet.engines.ort_backend import OrtBackend

    backend = OrtBackend(_add_cast_graph(tmp_path / "t.onnx"))
    feeds = {"a": torch.ones(2, 3), "b": torch.arange(6.0).reshape(2, 3), "i": torch.tensor([3, 4], dtype=torch.int32)}
    for run in (backend.run, lambda f: backend._run_bound(f, ["c", "j"])):  # plain and IO-binding paths
        with pytest.raises(EngineError, match=r"missing input\(s\) 'b', 'i'.*expects \['a', 'b', 'i'\]"):
            run({"a": feeds["a"]})
    plain = backend.run(feeds)
    bound = backend._run_bound(feeds, ["c", "j"])  # the CUDA code path, bound to CPU memory here
    assert set(bound) == {"c", "j"}
    for name in plain:
        assert torch.equal(plain[name], bound[name])
    assert torch.equal(bound["c"], feeds["a"] + feeds["b"])


def test_ortvalue_to_torch_uses_dlpack_without_a_host_copy() -> None:
    import onnxruntime as ort

    from sepsnet.engines.ort_backend import ortvalue_to_torch

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    value = ort.OrtValue.ortvalue_from_numpy(arr)
    assert hasattr(value, "__dlpack__")
    t = ortvalue_to_torch(value)
    assert t.data_ptr() == value.data_ptr() and torch.equal(t, torch.from_numpy(arr))  # shared, not copied

    class OldStyle:  # wrappers of older onnxruntime: to_dlpack() only
        def to_dlpack(self):
            return value._ortvalue.to_dlpack()

    class HostOnly:
        def numpy(self):
            return arr

    assert ortvalue_to_torch(OldStyle()).data_ptr() == value.data_ptr()
    assert torch.equal(ortvalue_to_torch(HostOnly()), torch.from_numpy(arr))


def test_trt_plugin_library_must_register_its_creator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TensorRT here: a fake registry stands in for ``trt.get_plugin_registry()``. The library is
    registered only through ``load_library`` (getCreators), once; a library without the creator is refused."""
    import types

    from sepsnet.export import trt_build

    class Registry:
        def __init__(self, creators, registers=None):
            self.creators, self.loaded, self.registers = creators, [], registers

        def get_creator(self, name, version, namespace):
            return self.creators.get((name, version, namespace))

        def load_library(self, path):
            self.loaded.append(path)
            if self.registers:
                self.creators[self.registers] = object()
            return object()

    lib = tmp_path / "libsepsnet_plugins.so"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setattr(trt_build, "_PLUGIN_HANDLES", {})
    empty = Registry({})
    fake = types.SimpleNamespace(__version__="10.9", get_plugin_registry=lambda: empty)
    with pytest.raises(EngineError, match=r"SEPSNetRoiBlend.*libsepsnet_plugins\.so.*TensorRT 10\.9"):
        trt_build.load_plugin_library(fake, lib)
    assert empty.loaded == [str(lib.resolve())] and not trt_build._PLUGIN_HANDLES
    good = Registry({}, registers=("SEPSNetRoiBlend", "1", ""))
    fake = types.SimpleNamespace(__version__="11.0", get_plugin_registry=lambda: good)
    trt_build.load_plugin_library(fake, lib)
    trt_build.load_plugin_library(fake, lib)  # a second load would make TensorRT refuse the library
    assert good.loaded == [str(lib.resolve())] and str(lib.resolve()) in trt_build._PLUGIN_HANDLES
    with pytest.raises(EngineError, match="not found"):
        trt_build.load_plugin_library(fake, tmp_path / "missing.so")


def _bench_json(main, args: list, out: Path) -> dict:
    assert main([*map(str, args), "--iters", "2", "--warmup", "0", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_onnx_sizes_and_argument_errors(artifacts: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.bench import main

    ckpt, bundle = artifacts
    dyn = tmp_path / "alone" / "dense.onnx"  # a dynamic dense-like graph: image (N,3,H,W)
    dyn.parent.mkdir()
    _tiny_onnx(dyn, {"image": ("float", ["batch", 3, "height", "width"])}, {"shape": ("int64", [4])},
               [("Shape", ["image"], ["shape"])])
    out = tmp_path / "b.json"
    assert _bench_json(main, [dyn, "--size", "64x96"], out)["input_shapes"] == {"image": [1, 3, 64, 96]}
    assert _bench_json(main, [dyn], out)["input_shapes"] == {"image": [1, 3, 512, 1024]}  # no manifest beside
    shutil.copy(bundle / "manifest.json", dyn.parent / "manifest.json")
    assert _bench_json(main, [dyn], out)["input_shapes"] == {"image": [1, 3, 128, 224]}  # the manifest's size
    # the static bundle graphs keep their size; a dynamic instance count gets a few instances
    assert _bench_json(main, [bundle / "dense.onnx"], out)["input_shapes"]["image"] == [1, 3, 128, 224]
    shapes = _bench_json(main, [bundle / "instance.onnx"], out)["input_shapes"]
    assert shapes["rois"][0] == shapes["attention"][0] > 0 and shapes["bases"][2:] == [32, 56]
    capsys.readouterr()
    unknown = tmp_path / "weights.txt"
    unknown.write_text("x")
    for args, why in [([dyn, "--size", "12x"], r"--size '12x': expected HEIGHTxWIDTH"),
                      ([bundle, "--size", "axb"], r"--size 'axb'"),
                      ([dyn, "--size", "0x64"], r"positive"),
                      ([bundle / "dense.onnx", "--size", "64x64"], r"static input size 128x224"),
                      ([dyn, "--iters", "0"], r"--iters"),
                      ([unknown], r"cannot benchmark .*weights\.txt.*\.pt, \.pth, \.ckpt")]:
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert re.search(why, err), err
    renamed = tmp_path / "tiny.ckpt"  # every checkpoint suffix is a checkpoint
    shutil.copy(ckpt, renamed)
    data = _bench_json(main, [renamed], out)
    assert data["kind"] == "checkpoint" and data["fps"] > 0


def test_backend_auto_says_which_and_device_selection(artifacts: tuple[Path, Path]) -> None:
    pred = PanopticPredictor.from_bundle(artifacts[1], device="cpu")
    assert pred.backend_choice.startswith("onnxruntime-cpu on cpu (auto: ")
    assert pred.dense.device == pred.instance.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="cuda:1"):
            PanopticPredictor.from_bundle(artifacts[1], device="cuda:1")
    with pytest.raises(EngineError, match="unknown device"):
        PanopticPredictor.from_bundle(artifacts[1], device="tpu:0")


def test_reused_input_buffer_padding_follows_the_frame_size(artifacts: tuple[Path, Path]) -> None:
    """The per-thread input buffer zeroes its padding only when the resized size changes; after a
    larger and a smaller frame in any order it still equals a fresh tensor (zero padding)."""
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    rng = np.random.default_rng(4)
    big, small = (rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in ((300, 520), (60, 90)))
    ptrs = set()
    for frame in (big, small, small, big, small):
        got, sizes = pred.preprocess(frame)
        fresh, fresh_sizes = pred.preprocess(frame, reuse=False)
        (rh, rw), _ = sizes
        assert sizes == fresh_sizes and (rh, rw) != tuple(got.shape[2:])  # a padded case
        assert torch.equal(got, fresh) and not fresh[..., rh:, :].any() and not fresh[..., :rh, rw:].any()
        ptrs.add(got.data_ptr())
    assert len(ptrs) == 1  # one reused buffer


def test_ort_sessions_do_not_spin_by_default(tmp_path: Path) -> None:
    """Intra-op threads that busy-wait after a run steal a core from the post-processing that follows
    (benchmarks/predictor_overhead.py); spinning is opt-in."""
    from sepsnet.engines.ort_backend import OrtBackend

    graph = _add_cast_graph(tmp_path / "t.onnx")
    key = "session.intra_op.allow_spinning"
    assert OrtBackend(graph, threads=2).session.get_session_options().get_session_config_entry(key) == "0"
    assert OrtBackend(graph, threads=2, spinning=True).session.get_session_options().get_session_config_entry(
        key) == "1"


def test_instance_engine_rewritten_for_cpu_gives_the_exported_outputs(artifacts: tuple[Path, Path]) -> None:
    """The bundle's instance graph loads on the CPU with its attention softmax rewritten, the two crops
    of the bases shared, the confidence head's 70-channel conv padded to 72 and the attention's bilinear
    upsampling done by two products (sepsnet.engines.ort_graph); on a real photo's candidates its outputs
    are the graph's as exported, up to float rounding."""
    from sepsnet.engines.ort_backend import OrtBackend

    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort", device="cpu")
    assert pred.instance.rewrites == {"softmax": 1, "roi_align": 1, "conv_channels": 1, "upsample": 1}
    assert not any(pred.dense.rewrites.values())  # the dense graph loads as exported
    plain = OrtBackend(artifacts[1] / "instance.onnx", device="cpu", cpu_rewrites=False)
    feeds = _photo_candidate_feeds(pred)
    got, ref = pred.instance.run(feeds), plain.run(feeds)
    assert set(got) == set(ref) == {"mask_probs", "iou_score", "silhouette_score"}
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-6), name


def _photo_candidate_feeds(pred: PanopticPredictor) -> dict[str, torch.Tensor]:
    """The instance engine's feeds for the candidates of the first sample photo."""
    from sepsnet.postprocess.candidates import level_entries, select_candidates

    prepared = pred.prepare(read_rgb(PHOTOS[0]))
    dense, _ = pred.run_dense(prepared)
    cands = select_candidates(dense["boxes"], dense["scores"], dense["centerness"], dense["attention"],
                              level_entries(dense["p3"].shape[-2:], pred.preselect), pred.postprocess,
                              [prepared.sizes[0]])[0]
    assert len(cands) > 2
    return {"bases": dense["bases"], "p3": dense["p3"], "attention": cands.attention,
            "rois": torch.cat([cands.batch_index[:, None].float(), cands.boxes], 1)}


def test_distinct_rows_need_the_same_box_and_attention() -> None:
    """Only rows equal in both box and attention are merged: the same box with another attention (another
    location's candidate) is a distinct row."""
    from sepsnet.engines.predictor import distinct_rows

    box, other = [0, 1, 2, 30, 40], [0, 5, 6, 70, 80]
    rois = torch.tensor([box, box, box, other], dtype=torch.float32)
    attention = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    attention[1] = attention[0]
    keep, inverse = distinct_rows(rois, attention)
    assert keep.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]
    assert distinct_rows(rois[[0, 2, 3]], attention[[0, 2, 3]]) is None
    assert distinct_rows(rois[:1], attention[:1]) is None


def test_repeated_candidate_rows_run_the_instance_engine_once(artifacts: tuple[Path, Path]) -> None:
    """A location kept for two classes gives two candidates with the same box and attention: on the CPU
    the instance engine gets each distinct row once, and every candidate gets the outputs of its row
    (equal to running all rows, up to float rounding; a repeat's outputs are its first row's)."""
    from sepsnet.engines.predictor import distinct_rows

    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort", device="cpu")
    feeds = _photo_candidate_feeds(pred)
    n = len(feeds["rois"])
    base = distinct_rows(feeds["rois"], feeds["attention"])
    distinct = n if base is None else len(base[0])
    order = torch.tensor([*range(n), 0, 2, 0])  # three repeats of real rows, at the end
    rois, attention = feeds["rois"][order], feeds["attention"][order]
    keep, inverse = distinct_rows(rois, attention)
    assert len(keep) == distinct and torch.equal(rois[keep][inverse], rois) and torch.equal(
        attention[keep][inverse], attention)
    seen: list[int] = []
    engine = pred.instance

    class Counting:
        device = engine.device
        thread_safe = True

        def run(self, feeds: dict) -> dict:
            seen.append(len(feeds["rois"]))
            return engine.run(feeds)

    pred.instance = Counting()
    got = pred._run_instances(feeds["bases"], feeds["p3"], rois, attention)
    ref = engine.run({"bases": feeds["bases"], "p3": feeds["p3"], "rois": rois, "attention": attention})
    assert seen == [distinct]
    assert set(got) == set(ref) == {"mask_probs", "iou_score", "silhouette_score"}
    for name in ref:
        assert got[name].shape == ref[name].shape and torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[name][n:], got[name][[0, 2, 0]])
    assert distinct_rows(rois[keep], attention[keep]) is None  # nothing repeats any more


def test_postprocess_threads_apply_to_the_frame_only(artifacts: tuple[Path, Path]) -> None:
    """``postprocess_threads`` sets torch's intra-op threads around the post-processing of a frame (seen
    from inside it, here by the instance engine's call) and restores them; the result is the same."""
    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort", device="cpu")
    frame = read_rgb(PHOTOS[0])
    ref = pred(frame)
    seen: list[int] = []
    engine = pred.instance

    class Spy:
        thread_safe, device, name = engine.thread_safe, engine.device, engine.name

        def run(self, feeds: dict) -> dict:
            seen.append(torch.get_num_threads())
            return engine.run(feeds)

    pred.instance = Spy()
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    pred.postprocess_threads = want
    got = pred(frame)
    assert seen == [want] and torch.get_num_threads() == before
    # a matmul may round differently on another thread count: pixels on the 0.5 threshold may flip
    assert (got.id_map != ref.id_map).float().mean() < 0.001
    assert [(s["category_id"], s["isthing"]) for s in got.segments_info] == [
        (s["category_id"], s["isthing"]) for s in ref.segments_info]


def test_predictor_overhead_benchmark_runs_on_a_folder_of_images(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    """benchmarks/predictor_overhead.py on a user folder: every part of the frame accounted for, shares
    consistent, JSON saved; a folder without images is a one-line error."""
    import importlib.util

    import cv2

    spec = importlib.util.spec_from_file_location("predictor_overhead", ROOT / "benchmarks" / "predictor_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    images = tmp_path / "frames"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), cv2.imread(str(PHOTOS[0])))
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "o.json"
    assert bench.main(["--bundle", str(artifacts[1]), "--images", str(images), "--size", "96x160", "--repeats", "1",
                       "--warmup", "0", "--compare-ort-defaults", "--profile-instance", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == ["a.jpg"] and doc["frame_hw"] == [96, 160]
    prof = doc["instance_engine_profile"]  # the instance graph's kernels, on the feeds of this frame
    assert prof["calls"] == 3 and prof["rows_per_call"] >= 1 and prof["kernel_ms_per_call"] > 0
    assert {"Conv", "RoiAlign"} <= set(prof["by_op_ms"]) and prof["top_nodes_ms"]
    # the confidence head's convolutions at the demo config (Sec. III-G): 14x14, 72 -> 256 -> 128 -> 32, then
    # 32 -> 8 at stride 2 (the first conv's input padded from 70 to 72 channels on the CPU)
    expected = 2 * 3 * 3 * (14 * 14 * (72 * 256 + 256 * 128 + 128 * 32) + 7 * 7 * 32 * 8) / 1e9
    assert prof["conv_gflop_per_row"] == pytest.approx(expected)
    for section in (doc, doc["ort_defaults"]):
        ms = section["median_ms"]
        parts = ms["dense"] + ms["instance_engine"] + ms["preprocess"] + ms["postprocess"] + ms["other"]
        assert abs(parts - ms["frame"]) < 1e-6 * max(1.0, ms["frame"]) and ms["dense"] > 0
        assert 0 < section["non_dense_share"] < 1 and section["overhead_share"] <= section["non_dense_share"]
    assert doc["machine"]["wall_s"] > 0 and len(doc["machine"]["load_average_1_5_15_before"]) == 3
    (images / "a.jpg").unlink()
    with pytest.raises(SystemExit, match="no images"):
        bench.main(["--bundle", str(artifacts[1]), "--images", str(images), "--out", str(out)])


def test_float_frame_in_0_1_warns_and_0_255_does_not() -> None:
    rng = np.random.default_rng(0)
    unit = rng.random((16, 24, 3)).astype(np.float32)
    with pytest.warns(FrameRangeWarning, match="0..1"):
        validate_frame(unit)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = validate_frame(unit * 255)
        validate_frame(np.zeros((16, 24, 3), np.float32))  # black: no guess
    assert out.dtype == np.uint8 and np.array_equal(out, np.clip(unit * 255, 0, 255).astype(np.uint8))
