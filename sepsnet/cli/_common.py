"""Shared CLI plumbing: turn sepsnet errors into one clear line and an exit code."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from sepsnet.errors import SEPSNetError


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; print ``error: <message>`` and return 2 on a :class:`SEPSNetError`."""
    try:
        return int(main(argv) or 0)
    except SEPSNetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

