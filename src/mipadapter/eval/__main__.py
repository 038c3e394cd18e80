"""`python -m mipadapter.eval` / `accelerate launch -m mipadapter.eval concept101 ...`: the `eval` command.

A thin shim over the CLI (`mipadapter.cli.eval`): under ``accelerate launch`` each process generates its
own slice of the run (`mipadapter.eval.ranks`) and the main one scores.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from mipadapter.cli.main import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
