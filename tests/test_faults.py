"""Fault injection, bad inputs: generated broken configs, checkpoints, images and command-line
arguments. The property under test is the class of failure, not one instance: every case ends in
the project's own error type (a one-line message naming the file / key / argument, exit code 2
from a CLI), never in a traceback, a hang, or a silent exit 0. Kill -9 of training: test_faults_kill.py.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from sepsnet.config import SEPSNetConfig, config_from_dict, load_config, parse_overrides
from sepsnet.config_checks import RULES
from sepsnet.errors import CheckpointError, ConfigError, DataError
from sepsnet.model.weights import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_synthetic.yaml"
ADVICE = ("weights_only=False", "weights_only` set to `False", "Re-running `torch.load`")


# -- configs ----------------------------------------------------------------------------------------
def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("files, start", [
    ({"a.yaml": "_base_: a.yaml\nsolver: {lr: 0.1}\n"}, "a.yaml"),  # includes itself
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"}, "a.yaml"),
    ({"a.yaml": "_base_: sub/b.yaml\n", "sub/b.yaml": "_base_: ../c.yaml\n", "c.yaml": "_base_: ./sub/b.yaml\n"},
     "a.yaml"),  # the same file under another spelling
])
def test_base_cycle_is_a_config_error_naming_the_file(tmp_path: Path, files: dict[str, str], start: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match="_base_ cycle") as err:
        load_config(tmp_path / start)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_base_chain_without_cycle_still_merges(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "solver: {lr: 0.5, max_iter: 7}\n")
    _write(tmp_path / "mid.yaml", "_base_: base.yaml\nsolver: {max_iter: 9}\n")
    _write(tmp_path / "top.yaml", "_base_: mid.yaml\n")
    _write(tmp_path / "other.yaml", "_base_: base.yaml\n")  # diamond-free reuse of one base
    cfg = load_config(tmp_path / "top.yaml")
    assert (cfg.solver.lr, cfg.solver.max_iter) == (0.5, 9)
    assert load_config(tmp_path / "other.yaml").solver.max_iter == 7


@pytest.mark.parametrize("base", ["[a.yaml]", "3", "''", "missing.yaml"])
def test_bad_base_value(tmp_path: Path, base: str) -> None:
    p = _write(tmp_path / "c.yaml", f"_base_: {base}\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)


def _non_utf8_variants(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    garbage = bytes(rng.randrange(128, 256) for _ in range(64))
    return [
        "solver:\n  lr: 0.01  # café\n".encode("latin-1"),
        "solver:\n  lr: 0.01\n".encode("utf-16"),  # BOM + NUL bytes
        b"\xff\xfe\x00" + garbage,
        b"model:\n  backbone: {name: resnet18}\n" + garbage,
        bytes(rng.randrange(256) for _ in range(256)) + b"\x80",
    ]


@pytest.mark.parametrize("index", range(5))
def test_non_utf8_config_is_a_config_error_naming_the_file(tmp_path: Path, index: int) -> None:
    p = _write(tmp_path / "bad.yaml", _non_utf8_variants(seed=16)[index])
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value)


def test_non_utf8_base_names_the_base(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "solver: {lr: 0.01}  # \xe9\n".encode("latin-1"))
    top = _write(tmp_path / "top.yaml", "_base_: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: not a UTF-8 text file"):
        load_config(top)


@pytest.mark.parametrize("text", ["model: [unclosed\n", "a: 1\n\tb: 2\n", "solver: {lr: 0.1\n", "- just\n- a list\n",
                                  "'unterminated\n", "solver:\n  lr: &x 1\n  momentum: *y\n"])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    p = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(err.value).startswith(str(p)) and "\n" not in str(err.value)


def test_config_that_is_a_folder_or_mapping_of_odd_keys(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "dir.yaml")
    p = _write(tmp_path / "keys.yaml", "1: a\nsolver: {lr: 0.1}\nnull: b\n")  # non-string keys
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(p)


def _float_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of every float (or optional float / float list) field of the config tree."""
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, f"{name}.")
        elif isinstance(value, float) or "float" in str(f.type):
            keys.append(name)
    return keys


def _set(raw: dict, dotted: str, value: Any) -> dict:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node[p]
    if isinstance(node[parts[-1]], list):
        value = [value] + node[parts[-1]][1:]
    node[parts[-1]] = value
    return raw


FLOAT_KEYS = _float_keys(SEPSNetConfig())


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_no_config_number_may_be_nan_or_inf(key: str, bad: float) -> None:
    raw = _set(SEPSNetConfig().to_dict(), key, bad)
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, where="cfg.yaml")
    assert key.split(".")[-1] in str(err.value) and str(err.value).startswith("cfg.yaml")


def _violations(dotted: str) -> list[Any]:
    """Values outside the rule of ``dotted``, derived from the rule text."""
    text = RULES[dotted][1]
    return {"> 0": [0, -1], ">= 0": [-1], ">= 1": [0, -3], "in [0, 1]": [-0.5, 1.5], "in (0, 1)": [0.0, 1.0],
            "in [0, 1)": [1.0, -0.1], "in (0, 1]": [0.0, 1.5]}[text]


RULE_CASES = [(k, v) for k in RULES if k != "model.loss_weights" for v in _violations(k)]


@pytest.mark.parametrize("key, value", RULE_CASES, ids=[f"{k}={v}" for k, v in RULE_CASES])
def test_out_of_range_values_are_refused_at_load(key: str, value: Any) -> None:
    raw = SEPSNetConfig().to_dict()
    node: Any = raw
    for part in key.split(".")[:-1]:
        if part not in node:
            pytest.skip(f"{key} is not a key of this config")
        node = node[part]
    if key.split(".")[-1] not in node:
        pytest.skip(f"{key} is not a key of this config")
    current = node[key.split(".")[-1]]
    if isinstance(current, int) and not isinstance(current, bool) and not float(value).is_integer():
        pytest.skip("integer key")
    if isinstance(current, int) and not isinstance(current, bool):
        value = int(value)
    _set(raw, key, value)
    with pytest.raises(ConfigError, match=r"must be") as err:
        config_from_dict(raw, where="cfg.yaml")
    assert key.split(".")[-1] in str(err.value)


@pytest.mark.parametrize("override", ["solver.lr=.nan", "solver.lr=0", "solver.lr=-0.01", "solver.momentum=1.0",
                                      "solver.weight_decay=-1e-4", "solver.gamma=0", "solver.warmup_iters=-1",
                                      "solver.max_iter=0", "solver.batch_size=0", "solver.clip_grad_norm=0",
                                      "solver.steps=[300, 200]", "solver.warmup_factor=.inf",
                                      "data.num_workers=-1", "data.pixel_std=[1, 0, 1]", "data.min_size_train=[96, 64]",
                                      "model.loss_weights.stuff=-1", "solver.log_period=0"])
def test_bad_solver_and_data_overrides(override: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides=parse_overrides([override]))
    assert override.split("=")[0].split(".")[-1] in str(err.value) and str(TINY) in str(err.value)


def test_valid_edges_still_load() -> None:
    cfg = load_config(TINY, overrides=parse_overrides(["solver.momentum=0", "solver.weight_decay=0",
                                                       "solver.gamma=1", "solver.warmup_iters=0",
                                                       "data.num_workers=0", "solver.steps=[]"]))
    assert cfg.solver.gamma == 1.0 and cfg.data.num_workers == 0


@pytest.mark.parametrize("items", [["solver=1", "solver.lr=2"], ["solver.lr=1", "solver.lr.x=2"],
                                   ["solver..lr=1"], ["=3"], [".lr=1"], ["solver.lr.=1"]])
def test_malformed_overrides(items: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(TINY, overrides=parse_overrides(items))


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from sepsnet.train.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model=torch.nn.Linear(16, 8), cfg=SEPSNetConfig(), iteration=3)
    return path.read_bytes()


@pytest.mark.parametrize("seed", range(3))
def test_truncated_checkpoints(tmp_path: Path, good_checkpoint: bytes, seed: int) -> None:
    rng = random.Random(seed)
    cuts = [0, 1, 10, len(good_checkpoint) - 1] + [rng.randrange(len(good_checkpoint)) for _ in range(6)]
    for cut in cuts:
        p = _write(tmp_path / f"cut{cut}.pt", good_checkpoint[:cut])
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(p)
        assert str(p) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("seed", range(3))
def test_flipped_bytes_load_or_fail_cleanly(tmp_path: Path, good_checkpoint: bytes, seed: int) -> None:
    """A flipped byte lands in the zip directory, the pickle or tensor data: either a CheckpointError
    or a dict comes back (tensor bytes carry no checksum), never another exception type."""
    rng = random.Random(seed)
    for i in range(8):
        data = bytearray(good_checkpoint)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        p = _write(tmp_path / f"flip{i}.pt", bytes(data))
        try:
            ckpt = load_checkpoint(p)
        except CheckpointError as exc:
            assert str(p) in str(exc)
        else:
            assert isinstance(ckpt["model"], dict)


class _Exploit:
    """A pickle payload that would run code on load (the classic ``__reduce__`` attack)."""

    def __init__(self, target: Path, func: Any) -> None:
        self.target, self.func = target, func

    def __reduce__(self) -> tuple:
        if self.func is os.system:
            return (os.system, (f"touch {self.target}",))
        if self.func is eval:
            return (eval, (f"open({str(self.target)!r}, 'w').close()",))
        return (self.func, (str(self.target), "w"))


@pytest.mark.parametrize("func", [os.system, eval, open], ids=["os.system", "eval", "open"])
@pytest.mark.parametrize("where", ["top", "inside_model"])
def test_code_executing_pickles_are_refused_without_torch_advice(tmp_path: Path, func: Any, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = _Exploit(marker, func)
    obj = {"format": "sepsnet-checkpoint/1", "model": {"w": torch.zeros(1), "x": payload}} if where == "inside_model" \
        else payload
    buf = io.BytesIO()
    torch.save(obj, buf)
    p = _write(tmp_path / "evil.pt", buf.getvalue())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    msg = str(err.value)
    assert "refused" in msg and str(p) in msg and "\n" not in msg
    assert not any(a in msg for a in ADVICE), msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_raw_pickle_and_zip_impostors(tmp_path: Path) -> None:
    cases = {
        "raw_pickle.pt": pickle.dumps({"model": {"w": [1.0]}}),
        "empty.pt": b"",
        "text.pt": b"this is not a checkpoint\n",
        "numpy.pt": np.arange(4).tobytes(),
    }
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    cases["zip.pt"] = buf.getvalue()
    for name, data in cases.items():
        p = _write(tmp_path / name, data)
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(p)
        assert not any(a in str(err.value) for a in ADVICE)


@pytest.mark.parametrize("obj", [[1, 2], {"state_dict": {}}, {"model": 5}, {"model": [torch.zeros(2)]},
                                 {"model": {}, "format": "other/9"}, torch.zeros(3), {"model": {}, "config": "x"},
                                 {"model": {}, "iteration": "7"}, {"model": {}, "meta": [1]}],
                         ids=["list", "no_model", "model_int", "model_list", "format", "tensor", "config_str",
                              "iteration_str", "meta_list"])
def test_foreign_checkpoints(tmp_path: Path, obj: Any) -> None:
    p = tmp_path / "foreign.pt"
    torch.save(obj, p)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        load_checkpoint(p)


def test_checkpoint_path_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


# -- images ---------------------------------------------------------------------------------------
def _bad_images(tmp_path: Path, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", rgb)
    ok2, jpg = cv2.imencode(".jpg", rgb)
    assert ok and ok2
    png, jpg = png.tobytes(), jpg.tobytes()
    out = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "header_only.jpg": jpg[:20],
        "text.jpg": b"<html>not an image</html>",
        "random.png": rng.integers(0, 256, 512, dtype=np.uint8).tobytes(),
    }
    ok3, png16 = cv2.imencode(".png", (rgb.astype(np.uint16) * 257))
    out["sixteen_bit.png"] = png16.tobytes()
    paths = {name: _write(tmp_path / name, data) for name, data in out.items()}
    (tmp_path / "folder.png").mkdir()
    paths["folder.png"] = tmp_path / "folder.png"
    paths["missing.png"] = tmp_path / "missing.png"
    return paths


@pytest.mark.parametrize("seed", range(2))
def test_bad_images_give_data_errors_naming_the_file(tmp_path: Path, seed: int) -> None:
    from sepsnet.data.coco_panoptic import read_rgb

    for name, path in _bad_images(tmp_path, seed).items():
        with pytest.raises(DataError) as err:
            read_rgb(path)
        assert name in str(err.value), name


def test_odd_but_valid_images_decode_to_rgb(tmp_path: Path) -> None:
    from sepsnet.data.coco_panoptic import read_rgb

    rng = np.random.default_rng(3)
    for name, img in {"grey.png": rng.integers(0, 256, (5, 7), dtype=np.uint8),
                      "rgba.png": rng.integers(0, 256, (5, 7, 4), dtype=np.uint8),
                      "one_pixel.png": np.zeros((1, 1, 3), np.uint8)}.items():
        cv2.imwrite(str(tmp_path / name), img)
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.shape[:2] == img.shape[:2]


# -- command-line arguments, output paths, devices ---------------------------------------------------
def _cli(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    import importlib

    module = importlib.import_module(f"sepsnet.cli.{name}")
    rc = module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


# (command, arguments that are fine except for the one under test; inputs that do not exist, so an
# error about them would show the argument was not checked first)
BASE = {
    "train": ["--config", str(TINY), "--out", "{tmp}/run"],
    "evaluate": ["--checkpoint", "{tmp}/missing.pt"],
    "export": ["{tmp}/missing.pt", "--out", "{tmp}/bundle", "--onnx-only"],
    "demo": ["--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/demo", "{tmp}/missing.png"],
    "bench": ["{tmp}/missing.pt"],
    "synth": ["--out", "{tmp}/syn", "--n", "2"],
    "pq": ["--gt-json", "{tmp}/gt.json", "--pred-json", "{tmp}/pred.json"],
}
NUMERIC = [
    ("train", "--max-iter", ["0", "-5", "2.5", "abc"]), ("train", "--max-minutes", ["0", "-1", "nan", "inf"]),
    ("evaluate", "--max-images", ["0", "-1"]), ("evaluate", "--boundary", ["-1", "0", "1", "1.5", "nan"]),
    ("export", "--height", ["0", "-32"]), ("export", "--width", ["0", "x"]), ("export", "--max-batch", ["0"]),
    ("export", "--calib-count", ["0", "-2"]), ("export", "--workspace-gib", ["0", "-1", "nan"]),
    ("bench", "--iters", ["0", "-3"]), ("bench", "--warmup", ["-1", "1e3"]), ("bench", "--threads", ["0"]),
    ("synth", "--n", ["0", "-1"]), ("synth", "--val-n", ["-1"]), ("synth", "--size", ["0"]),
    ("synth", "--seed", ["-4"]),
    ("pq", "--workers", ["0", "-2"]), ("pq", "--dilation-ratio", ["0", "1", "-0.02", "inf"]),
]
NUMERIC_CASES = [(c, f, v) for c, f, vs in NUMERIC for v in vs]


@pytest.mark.parametrize("command, flag, value", NUMERIC_CASES, ids=[f"{c}{f}={v}" for c, f, v in NUMERIC_CASES])
def test_numeric_arguments_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, flag: str,
                                         value: str) -> None:
    argv = [a.format(tmp=tmp_path) for a in BASE[command]] + [f"{flag}={value}"]
    rc, err = _cli(command, argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err
    assert not (tmp_path / "run").exists() and not (tmp_path / "syn").exists()  # nothing started


@pytest.mark.parametrize("command", ["train", "evaluate", "export", "demo", "bench", "synth", "pq", "shapes"])
def test_missing_or_unknown_arguments_are_one_line(capsys: pytest.CaptureFixture, command: str) -> None:
    for argv in ([], ["--no-such-flag"]):
        rc, err = _cli(command, argv, capsys)
        if command in ("export", "evaluate") and argv == []:  # all optional; the missing input is named
            assert rc == 2 and len(err) == 1 and "checkpoint" in err[0], err
            continue
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: sepsnet-") and "--help" in err[0], err


def test_help_still_prints_usage(capsys: pytest.CaptureFixture) -> None:
    from sepsnet.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--max-iter" in capsys.readouterr().out


OUT_DIR_FLAGS = [("train", "--out"), ("evaluate", "--out"), ("export", "--out"), ("demo", "--out"),
                 ("synth", "--out")]
OUT_FILE_FLAGS = [("bench", "--json"), ("pq", "--json-out"), ("export", "--timing-cache")]


@pytest.mark.parametrize("command, flag", OUT_DIR_FLAGS)
@pytest.mark.parametrize("case", ["file", "under_file"])
def test_output_folder_problems_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture, command: str,
                                                    flag: str, case: str) -> None:
    blocker = _write(tmp_path / "blocker", "x")
    target = blocker if case == "file" else blocker / "sub"
    argv = [a.format(tmp=tmp_path) for a in BASE[command]] + [flag, str(target)]
    rc, err = _cli(command, argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {flag} ") and "not a folder" in err[0], err
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("command, flag", OUT_FILE_FLAGS)
def test_output_file_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, flag: str) -> None:
    (tmp_path / "taken").mkdir()
    argv = [a.format(tmp=tmp_path) for a in BASE[command]] + [flag, str(tmp_path / "taken")]
    rc, err = _cli(command, argv, capsys)
    assert rc == 2 and len(err) == 1 and flag in err[0] and "is a folder" in err[0], err


def test_output_file_that_is_an_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = _write(tmp_path / "gt.json", "{}")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = _write(bundle / "manifest.json", "{}")
    for command, argv in [("pq", ["--gt-json", str(gt), "--pred-json", str(gt), "--json-out", str(gt)]),
                          ("bench", [str(bundle), "--json", str(manifest)])]:
        rc, err = _cli(command, argv, capsys)
        assert rc == 2 and len(err) == 1 and "refusing to overwrite" in err[0], err
    assert gt.read_text() == "{}" and manifest.read_text() == "{}"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command, flag", OUT_DIR_FLAGS + OUT_FILE_FLAGS)
def test_read_only_output_location(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, flag: str) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        argv = [a.format(tmp=tmp_path) for a in BASE[command]] + [flag, str(ro / "out")]
        rc, err = _cli(command, argv, capsys)
    finally:
        ro.chmod(0o755)
    assert rc == 2 and len(err) == 1 and flag in err[0], err


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("device", ["gpu0", "cuda:99", "xpu", "", "cpu:x", "cuda" + "-" * 3])
def test_unknown_or_absent_devices(tmp_path: Path, capsys: pytest.CaptureFixture, command: str, device: str) -> None:
    argv = [a.format(tmp=tmp_path) for a in BASE[command]] + ["--device", device]
    rc, err = _cli(command, argv, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --device"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err = _cli("train", [a.format(tmp=tmp_path) for a in BASE["train"]] + ["--device", "cuda"], capsys)
    assert rc == 2 and len(err) == 1 and "no CUDA GPU" in err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override", ["data.num_workers=-1", "solver.lr=.nan", "solver.batch_size=0"])
def test_train_refuses_bad_config_values(tmp_path: Path, capsys: pytest.CaptureFixture, override: str) -> None:
    rc, err = _cli("train", [a.format(tmp=tmp_path) for a in BASE["train"]] + ["--set", override], capsys)
    assert rc == 2 and len(err) == 1 and override.split("=")[0] in err[0], err


def test_disk_full_during_work_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """A write that hits a full disk (the OSError ENOSPC a write raises then) after the start-up checks."""
    import errno

    from sepsnet.cli._common import run_cli

    def main(argv: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/panoptic_predictions.json")

    assert run_cli(main, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0].lower()
