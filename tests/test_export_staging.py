"""Bundles are built beside --out and published at the end: a re-export, interrupted or failed, never
leaves a working bundle unusable (sepsnet.export.staging)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sepsnet.cli.export import main as export_main
from sepsnet.errors import BundleError
from sepsnet.export import bundle, staging

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 96


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def _fake_bundle(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / bundle.MANIFEST).write_text(json.dumps({"files": {n: {} for n in files}}))


def test_publish_replaces_bundle_files_keeps_foreign_ones(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _fake_bundle(out, {"dense.onnx": b"old", "dense.plan": b"old plan"})
    (out / "notes.txt").write_text("mine")
    with staging.staged(out) as work:
        assert work.parent == out.parent and work != out
        _fake_bundle(work, {"dense.onnx": b"new", "dense.fp16.onnx": b"new16"})
        assert (out / "dense.onnx").read_bytes() == b"old"  # untouched until the block completes
    assert (out / "dense.onnx").read_bytes() == b"new" and (out / "dense.fp16.onnx").read_bytes() == b"new16"
    assert not (out / "dense.plan").exists()  # the old bundle's file the new one lacks
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / bundle.MANIFEST).read_text())["files"].keys() == {"dense.onnx", "dense.fp16.onnx"}
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_failed_build_leaves_the_old_bundle_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _fake_bundle(out, {"dense.onnx": b"old"})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="boom"), staging.staged(out) as work:
        (work / "dense.onnx").write_bytes(b"half")
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_publish_refuses_a_staged_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no manifest.json"), staging.staged(tmp_path / "b") as work:
        (work / "dense.onnx").write_bytes(b"x")
    assert not (tmp_path / "b").exists()


def test_dead_staging_folders_are_removed_live_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = staging.staging_path(out, int(done.stdout))
    live = staging.staging_path(out, os.getppid())
    other = tmp_path / ".other.staging-1"
    for folder in (dead, live, other):
        folder.mkdir()
    assert staging.remove_dead_staging(out) == [dead]
    assert live.is_dir() and other.is_dir() and not dead.exists()


def test_export_over_a_bundle_refuses_a_file_as_out(ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("not a folder")
    assert export_main([str(ckpt), "--out", str(out), "--onnx-only", "--height", str(H), "--width", str(W)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_kill_during_reexport_keeps_a_valid_bundle(ckpt: Path, tmp_path: Path) -> None:
    """kill -9 during a rewrite of a working bundle B (``--from-onnx B --fp16``), once its fp16 graph is
    written: B still holds a bundle that verifies (the old one, or the new one when publishing had
    completed), and the dead export's staging folder is cleared the way the next export starts. Before
    staging, the rewrite removed B's manifest first, and this kill left no usable bundle."""
    out = tmp_path / "bundle"
    assert export_main([str(ckpt), "--out", str(out), "--onnx-only", "--height", str(H), "--width", str(W)]) == 0
    first = bundle.verify_bundle(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "sepsnet.cli.export", "--from-onnx", str(out), "--fp16"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = staging.staging_path(out, proc.pid)
    deadline = time.monotonic() + 120
    # the moment a new graph exists (in the staging folder; an in-place rewrite would have dropped the
    # manifest by then)
    while (not (work / "dense.fp16.onnx").exists() and (out / bundle.MANIFEST).exists()
           and proc.poll() is None and time.monotonic() < deadline):
        time.sleep(0.002)
    assert proc.poll() is None, "the export ended before the moment to kill it"

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = bundle.verify_bundle(out)
    assert after["precision"] in ("fp32", "fp16")
    assert set(first["files"]) <= set(after["files"])
    staging.remove_dead_staging(out)  # what the next export does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
