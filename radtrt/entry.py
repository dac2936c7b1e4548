"""The ``radtrt`` console script: imports the CLI, then runs it.

Why a module of its own: ``radtrt.cli`` imports torch and every command group when it is imported, a second or
more before ``main`` handles anything, and a Ctrl-C in that time printed a 30-line ``KeyboardInterrupt``
traceback. Here the import is guarded, and an interrupt during it exits 130 as an interrupted command does.
This module imports nothing heavy itself. (``python -m radtrt.cli`` still works; it runs the same ``main``.)
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what typer and a shell give an interrupted command


def main() -> None:
    try:
        from radtrt.cli import main as cli_main
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    cli_main()


if __name__ == "__main__":
    main()
