"""CLI placeholder: replaced when its issue lands."""
from __future__ import annotations

import sys

from sepsnet.cli._common import not_implemented


def main() -> int:
    return not_implemented("sepsnet-demo", "see the open issues")


if __name__ == "__main__":
    sys.exit(main())
