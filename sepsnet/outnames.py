"""Output names that never collide silently.

Several inputs can share a stem (``a/frame.png`` and ``b/frame.png``); writing ``frame_overlay.png``
for both would lose the first. :func:`unique_stems` gives each input a distinct output stem (the
stem, prefixed with as many parent folders as it takes: ``a_frame``, ``b_frame``; then the suffix:
``frame_png``, ``frame_jpg``) and refuses, naming both, an input given twice.
"""
from __future__ import annotations

import re
from pathlib import Path

from sepsnet.errors import DataError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """``text`` reduced to file-name-safe characters (a camera pipeline or URL becomes readable)."""
    return _UNSAFE.sub("_", text).strip("._") or "input"


def _identity(spec: str) -> str:
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def _candidates(spec: str, kind: str) -> list[str]:
    """Output stems for one input, from the shortest to the most specific."""
    if kind == "camera":
        return [f"camera{int(spec)}"]
    if kind == "stream":
        return [safe_name(spec)[:80]]
    path = Path(spec)
    stem = safe_name(path.stem)
    dirs = [safe_name(p) for p in path.parent.parts if p not in ("/", ".", "..")]
    names = ["_".join([*dirs[len(dirs) - d:], stem]) for d in range(len(dirs) + 1)]
    if path.suffix:
        names.append(f"{names[-1]}_{safe_name(path.suffix)}")
    return names


def unique_stems(inputs: list[str], kinds: list[str] | None = None) -> list[str]:
    """A distinct output stem per input (compared case-insensitively, for case-insensitive file
    systems). ``kinds``: ``camera``/``stream``/anything else (a file) per input. DataError naming
    both inputs when one is given twice or no distinct name exists."""
    kinds = kinds or ["file"] * len(inputs)
    seen: dict[str, int] = {}
    for i, spec in enumerate(inputs):
        key = _identity(str(spec))
        if key in seen:
            raise DataError(f"input {inputs[seen[key]]!r} and input {spec!r} are the same; give it once")
        seen[key] = i
    options = [_candidates(str(s), k) for s, k in zip(inputs, kinds)]
    level = [0] * len(inputs)
    while True:
        groups: dict[str, list[int]] = {}
        for i, opts in enumerate(options):
            groups.setdefault(opts[level[i]].casefold(), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [opts[level[i]] for i, opts in enumerate(options)]
        for group in clashes:
            movable = [i for i in group if level[i] + 1 < len(options[i])]
            if not movable:
                a, b = group[:2]
                raise DataError(f"inputs {inputs[a]!r} and {inputs[b]!r} would write the same output name "
                                f"{options[a][level[a]]!r}; rename one")
            for i in movable:
                level[i] += 1
