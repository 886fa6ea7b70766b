"""Shared CLI plumbing: one-line errors and exit codes, argparse types for numeric arguments, and
checks of output paths and devices that every command runs before any long work.

Exit codes: 0 done, 2 a user error (bad argument, file, path, device; message on stderr),
130 interrupted. ``SEPSNET_TRACEBACK=1`` re-raises instead, for debugging.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from sepsnet.errors import SEPSNetError, UsageError

__all__ = ["UsageError", "check_device", "check_not_input", "check_output_dir", "check_output_file", "nonnegative_int",
           "open_ratio", "positive_float", "positive_int", "preflight", "run_cli"]

# OSError numbers that describe the user's environment (disk, permissions, paths), not a bug
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE, errno.EFBIG}


def _argparse_error(self: argparse.ArgumentParser, message: str) -> NoReturn:
    """``ArgumentParser.error`` while a command runs: one line instead of usage + message."""
    raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


@contextlib.contextmanager
def _one_line_argparse_errors() -> Iterator[None]:
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _argparse_error  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; print ``error: <message>`` and return 2 on a :class:`SEPSNetError` (argument
    errors included: argparse's are turned into one line) or on an ``OSError`` caused by the
    environment (disk full, read-only folder, missing path, ...)."""
    try:
        with _one_line_argparse_errors():
            return int(main(argv) or 0)
    except SEPSNetError as exc:
        if os.environ.get("SEPSNET_TRACEBACK"):
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if os.environ.get("SEPSNET_TRACEBACK") or exc.errno not in _USER_ERRNOS:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(text: str) -> str:
    """A message on one line: its lines, stripped, joined by spaces."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def describe_os_error(exc: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``x: no space left on device``."""
    what = (exc.strerror or str(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else what


# -- argparse types: a bad value is one line (``error: sepsnet-x: argument --n: ...``), exit code 2 -----
def _number(text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (iterations, counts, sizes)."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (warm-up counts, seeds, optional counts)."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (minutes, GiB)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value:g}")
    return value


def open_ratio(text: str) -> float:
    """A fraction strictly between 0 and 1 (Boundary PQ dilation ratio)."""
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a ratio in (0, 1), got {value:g}")
    return value


# -- outputs ------------------------------------------------------------------------------------------
def _probe_write(folder: Path, what: str) -> None:
    """Create, fill and remove a small temp file in ``folder``: a read-only folder or file system,
    missing permissions or a full disk fail here, before any long work."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sepsnet-probe.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(f"{what} {folder}: cannot write there ({describe_os_error(exc)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"{what} {folder}: cannot write there ({describe_os_error(exc)})") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _make_folder(folder: Path, what: str) -> None:
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            where = "" if parent == folder else f" ({parent} is a file)"
            raise UsageError(f"{what} {folder}: exists and is not a folder{where}")
        if parent.is_dir():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{what} {folder}: cannot create the folder ({describe_os_error(exc)})") from None


def check_output_dir(path: str | Path | None, what: str = "--out") -> Path | None:
    """Make sure ``path`` is (or can become) a writable folder: refuses an existing file, a path
    under a file, a read-only or full location. Creates the folder. ``None`` passes through."""
    if path is None:
        return None
    folder = Path(path)
    _make_folder(folder, what)
    _probe_write(folder, what)
    return folder


def check_output_file(path: str | Path | None, what: str = "--json") -> Path | None:
    """Make sure ``path`` can be written as a file: refuses an existing folder, a parent that is a
    file, a read-only or full location. Creates the parent folder; ``None`` passes through."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{what} {target}: is a folder; give a file name")
    if target.exists() and not target.is_file():
        raise UsageError(f"{what} {target}: exists and is not a regular file")
    _make_folder(target.parent, what)
    _probe_write(target.parent, what)
    return target


def check_device(spec: str | None, what: str = "--device") -> str | None:
    """Refuse an unknown device string (``gpu0``), CUDA without a CUDA GPU, a GPU index past the
    last one. Accepts ``cpu``, ``cuda``, ``cuda:N`` (and ``mps`` where available). ``None`` = default."""
    if spec is None:
        return None
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"{what} {spec!r}: unknown device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{what} {spec}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"{what} {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA GPU(s) "
                             f"(cuda:0..cuda:{count - 1})")
        return spec
    if device.type == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return spec
    raise UsageError(f"{what} {spec!r}: device type {device.type!r} is not supported here; "
                     "expected cpu, cuda or cuda:N")


def check_not_input(path: str | Path | None, what: str, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output file that is one of the inputs, or an existing file inside an input folder
    (``sepsnet-pq --json-out gt.json``, ``sepsnet-bench BUNDLE --json BUNDLE/manifest.json``)."""
    if path is None or not Path(path).is_file():
        return
    target = Path(path).resolve()
    for flag, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        src = Path(given).resolve()
        if target == src or (src.is_dir() and src in target.parents):
            where = "is" if target == src else "lies inside"
            raise UsageError(f"{what} {path} {where} the input {flag} {given}: refusing to overwrite it; "
                             "write the output elsewhere")


def preflight(*, device: str | None = None, out_dirs: dict[str, str | Path | None] | None = None,
              out_files: dict[str, str | Path | None] | None = None,
              inputs: dict[str, str | Path | None] | None = None) -> None:
    """The checks a command runs right after parsing its arguments, before any long work:
    ``device`` (:func:`check_device`), each ``{flag: folder}`` (:func:`check_output_dir`) and each
    ``{flag: file}`` (:func:`check_output_file`, and :func:`check_not_input` against ``inputs``);
    ``None`` values are skipped."""
    check_device(device)
    for flag, file in (out_files or {}).items():
        check_not_input(file, flag, inputs or {})
    for flag, folder in (out_dirs or {}).items():
        check_output_dir(folder, flag)
    for flag, file in (out_files or {}).items():
        check_output_file(file, flag)
