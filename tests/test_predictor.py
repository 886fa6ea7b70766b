"""Runtime: ORT bundle vs eager checkpoint on real photos, bad frames, threads, memory, bench."""
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sepsnet.config import load_config, parse_overrides
from sepsnet.data.coco_panoptic import read_rgb
from sepsnet.engines.predictor import PanopticPredictor
from sepsnet.errors import BundleError, EngineError, FrameError
from sepsnet.model import build_model
from sepsnet.train.checkpoint import save_checkpoint

ROOT = Path(__file__).parents[1]
SHARED = ROOT.parent / "shared" / "data"
PHOTOS = sorted((SHARED / "coco_panoptic_sample" / "images").glob("*.jpg")) + sorted(
    (SHARED / "cityscapes_sample" / "leftImg8bit" / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sepsnet.cli.export import main as export_main

    tmp = tmp_path_factory.mktemp("rt")
    cfg = load_config(ROOT / "configs" / "tiny_synthetic.yaml", overrides=parse_overrides([
        "data.min_size_test=128", "data.max_size_test=224", "postprocess.score_thresh=0.005",
        "postprocess.instance_score_thresh=0.0", "postprocess.stuff_area_limit=16", "postprocess.max_instances=20"]))
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
    instances = 0
    for photo in PHOTOS:
        rgb = read_rgb(photo)
        a, b = ort_pred(rgb), torch_pred(rgb)
        assert a.id_map.shape == b.id_map.shape == rgb.shape[:2]
        instances += len(a.instance_scores)
        assert len(a.instance_scores) == len(b.instance_scores)
        assert torch.allclose(a.instance_scores, b.instance_scores, atol=1e-4)
        # identical segmentation up to pixels on a mask's 0.5 threshold
        assert (a.id_map != b.id_map).float().mean() < 0.005
        assert sorted((s["category_id"], s["isthing"]) for s in a.segments_info) == sorted(
            (s["category_id"], s["isthing"]) for s in b.segments_info)
        assert set(a.timings) >= {"preprocess", "dense", "nms", "instance", "postprocess", "total"}
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
    (np.zeros((64, 64), np.uint8), "HxWx3"),
    (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
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


def test_threads_and_memory(artifacts: tuple[Path, Path]) -> None:
    import psutil

    pred = PanopticPredictor.from_bundle(artifacts[1], backend="ort")
    frame = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    ref = pred(frame).id_map
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                assert torch.equal(pred(frame).id_map, ref)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    proc = psutil.Process()
    for _ in range(30):
        pred(frame)
    rss0 = proc.memory_info().rss
    for _ in range(150):
        pred(frame)
    growth_mb = (proc.memory_info().rss - rss0) / 2**20
    assert growth_mb < 40, f"resident memory grew {growth_mb:.1f} MiB over 150 frames"


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


def test_demo_cli_from_checkpoint(artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    from sepsnet.cli.demo import main

    cfg = ROOT / "configs" / "tiny_synthetic.yaml"
    assert main(["--config", str(cfg), "--checkpoint", str(artifacts[0]), "--out", str(tmp_path / "o"),
                 str(PHOTOS[-1])]) == 0
    assert (tmp_path / "o" / f"{PHOTOS[-1].stem}_overlay.png").is_file()
    doc = json.loads((tmp_path / "o" / "panoptic_predictions.json").read_text())
    assert [a["file_name"] for a in doc["annotations"]] and (tmp_path / "o").rglob("*.png")
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x"), str(PHOTOS[0])]) == 2
