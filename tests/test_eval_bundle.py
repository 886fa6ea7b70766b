"""sepsnet-eval --bundle / --compare: a bundle is scored like a checkpoint, through PanopticPredictor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sepsnet.cli.evaluate import main as eval_main
from sepsnet.cli.export import main as export_main
from sepsnet.cli.train import main as train_main
from sepsnet.data.synthetic import generate
from sepsnet.eval import bundle_eval

ROOT = Path(__file__).resolve().parents[1]
# small frames, every detection kept, a few iterations: a trained model that predicts things and stuff
SMALL = ["data.min_size_train=[96,96]", "data.max_size_train=128", "data.min_size_test=96", "data.max_size_test=128",
         "data.num_workers=0", "solver.batch_size=2", "solver.warmup_iters=2", "solver.checkpoint_period=0",
         "solver.log_period=100", "postprocess.score_thresh=0.0", "postprocess.instance_score_thresh=0.0",
         "postprocess.stuff_area_limit=1", "postprocess.max_instances=20"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalbundle")
    generate(root / "syn", 6, 3, seed=11, size=96)
    rc = train_main(["--config", str(ROOT / "configs" / "tiny_synthetic.yaml"), "--data", str(root / "syn"),
                     "--out", str(root / "train"), "--max-iter", "6", "--device", "cpu", "--no-progress",
                     "--set", *SMALL])
    assert rc == 0
    return root / "train" / "model_final.pt", root / "syn"


def test_compare_dynamic_fp32_bundle_equals_checkpoint(trained, tmp_path: Path, capsys) -> None:
    """The comparison table: checkpoint row and the dynamic fp32 bundle row, which is scored through the
    runtime (ONNX Runtime, same padding to a multiple of 32 as evaluation) and matches the checkpoint."""
    ckpt, data = trained
    bundle = tmp_path / "bundle"
    assert export_main([str(ckpt), "--out", str(bundle), "--onnx-only", "--dynamic", "--max-batch", "2"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.json"
    assert eval_main(["--checkpoint", str(ckpt), "--bundle", str(bundle), "--compare", "--data", str(data),
                      "--device", "cpu", "--json", str(out), "--boundary"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint (PyTorch)" in text and "fp32" in text and "dPQ" in text
    table = json.loads(out.read_text())
    assert table["input"] == "dynamic" and [r["name"] for r in table["rows"]] == ["checkpoint (PyTorch)", "fp32"]
    ckpt_row, fp32 = table["rows"]
    assert ckpt_row["images"] == fp32["images"] == 3
    assert ckpt_row["PQ"] > 0.0, "the trained model must predict something for the comparison to mean anything"
    for key in ("PQ", "PQ_th", "PQ_st", "mask_AP"):
        assert fp32[key] == pytest.approx(ckpt_row[key], abs=0.5), key  # PQ points (0..100)
        assert fp32[f"delta_{key}"] == pytest.approx(fp32[key] - ckpt_row[key], abs=1e-9)
    assert fp32["graphs"] == {"dense": "dense.onnx", "instance": "instance.onnx"}
    # the single-bundle mode prints the usual evaluation; a precision the bundle lacks is refused with the fix
    assert eval_main(["--bundle", str(bundle), "--data", str(data), "--no-ap"]) == 0
    assert "PQ" in capsys.readouterr().out
    assert eval_main(["--bundle", str(bundle), "--data", str(data), "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "not int8" in err and "--int8 --calib DIR" in err


def test_eval_cli_argument_errors(trained, capsys) -> None:
    ckpt, data = trained
    assert eval_main(["--data", str(data)]) == 2
    assert "--checkpoint C or --bundle DIR" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(ckpt), "--compare"]) == 2
    assert "--compare needs both" in capsys.readouterr().err
    assert eval_main(["--bundle", str(ckpt.parent / "nothing"), "--data", str(data)]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_graph_sets_of_each_precision() -> None:
    """Every distinct graph a TensorRT 10 / 11 build uses, as ONNX Runtime can run it."""
    def manifest(prec: str, dense11: str, dense10: str, inst11: str, files: tuple[str, ...] = ()) -> dict:
        return {"precision": prec, "files": {f: {} for f in files},
                "graphs": {"dense": {"onnx": "dense.onnx", "engine_onnx": dense11, "engine_onnx_trt10": dense10},
                           "instance": {"onnx": "instance.onnx", "engine_onnx": inst11,
                                        "engine_onnx_trt10": "instance.onnx"}}}

    fp16 = bundle_eval.graph_sets(manifest("fp16", "dense.fp16.onnx", "dense.onnx", "instance.fp16.onnx"))
    assert [(s.name, s.dense, s.instance) for s in fp16] == [
        ("fp32", "dense.onnx", "instance.onnx"),
        ("fp16 (TensorRT 11 graph)", "dense.fp16.onnx", "instance.fp16.onnx")]  # TRT 10 fp16 = fp32 graph + flag
    int8 = bundle_eval.graph_sets(manifest("int8", "dense.fp16.int8.onnx", "dense.int8.onnx", "instance.onnx"))
    assert [(s.name, s.dense) for s in int8] == [("fp32", "dense.onnx"),
                                                 ("int8 (TensorRT 11 graph)", "dense.fp16.int8.onnx"),
                                                 ("int8 (TensorRT 10 graph)", "dense.int8.onnx")]
    plugin = bundle_eval.graph_sets(manifest("fp16", "dense.fp16.onnx", "dense.onnx", "instance.plugin.fp16.onnx"))
    assert plugin[1].instance == "instance.onnx" and "needs the TensorRT plugin" in plugin[1].notes[0]
    m = manifest("int8", "dense.fp16.int8.onnx", "dense.int8.onnx", "instance.onnx")
    assert bundle_eval.select(m, "int8", "ort", "10").dense == "dense.int8.onnx"
    assert bundle_eval.select(m, None).dense == "dense.onnx"
