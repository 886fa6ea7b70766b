"""Build a bundle beside its destination, then publish it (DESIGN.md "Export bundle").

An export takes seconds to minutes (graph export, fp16 conversion, int8 calibration). Written in
place, a re-export over a working bundle would leave it unusable for that whole time, and for good
if the process is killed. So :func:`staged` hands out a sibling folder on the same file system
(``.<name>.staging-<pid>``); :func:`publish` then moves the finished files into the destination with
``os.replace`` (atomic per file), the manifest last, and only then removes the files of the old
bundle that the new one does not have. A kill -9 before publishing leaves the old bundle as it was;
the window in which the folder mixes old and new files is the few renames of the publish step, and
the manifest (which lists every file with its sha256) makes such a folder fail verification by name
instead of loading stale graphs. Files in the destination that belong to no bundle are left alone.
Staging folders of dead exports are removed by the next export to the same destination.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sepsnet.errors import BundleError
from sepsnet.export import bundle

STAGING_TAG = ".staging-"


def staging_path(out: Path, pid: int | None = None) -> Path:
    """The staging folder of ``out`` for process ``pid`` (this one by default)."""
    return out.parent / f".{out.name}{STAGING_TAG}{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_dead_staging(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` left by exports that no longer run; the removed paths."""
    removed = []
    prefix = f".{out.name}{STAGING_TAG}"
    if not out.parent.is_dir():
        return removed
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix) or not path.is_dir():
            continue
        pid = path.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _bundle_files(folder: Path) -> set[str]:
    """The files the manifest of ``folder`` lists (empty when it has none or it is unreadable)."""
    try:
        return set(json.loads((folder / bundle.MANIFEST).read_text(encoding="utf-8")).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(work: Path, out: Path, stale: Iterable[str] = ()) -> None:
    """Move the finished bundle ``work`` into ``out``: the whole folder when ``out`` does not exist,
    else file by file with the manifest last, then remove the old bundle's files (its manifest's list,
    plus ``stale`` names) that the new bundle lacks."""
    if not (work / bundle.MANIFEST).is_file():
        raise BundleError(f"{work}: staged bundle has no {bundle.MANIFEST}; nothing published")
    if not out.exists():
        os.replace(work, out)
        _fsync_dir(out.parent)
        return
    if not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a folder")
    old = _bundle_files(out) | set(stale)
    new = {p.name for p in work.iterdir() if p.is_file() and p.name != bundle.MANIFEST}
    for name in sorted(new):
        os.replace(work / name, out / name)
    os.replace(work / bundle.MANIFEST, out / bundle.MANIFEST)
    _fsync_dir(out)
    for name in sorted(old - new - {bundle.MANIFEST}):
        target = out / name
        if target.parent == out and target.is_file():
            target.unlink()
    shutil.rmtree(work, ignore_errors=True)


def seed_from(src: Path, work: Path, names: Iterable[str]) -> None:
    """Put the files ``names`` of bundle ``src`` into ``work``: hard links where the file system allows
    (no copy of large graphs; publishing replaces the names, never the linked content), else copies."""
    for name in names:
        if not (src / name).is_file():
            continue
        try:
            os.link(src / name, work / name)
        except OSError:
            shutil.copy2(src / name, work / name)


@contextmanager
def staged(out: Path, stale: Iterable[str] = ()) -> Iterator[Path]:
    """A fresh staging folder beside ``out`` to build the bundle in; published into ``out`` when the
    block completes, removed when it raises (``out`` untouched then)."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out)
    work = staging_path(out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
        publish(work, out, stale)
    finally:
        shutil.rmtree(work, ignore_errors=True)
