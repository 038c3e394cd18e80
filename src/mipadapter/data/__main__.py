"""`python -m mipadapter.data` / `accelerate launch -m mipadapter.data build ...`: the `data` command.

A thin shim: argument parsing lives with the CLI (`mipadapter.cli.data`), like every entry point.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from mipadapter.cli.data import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
