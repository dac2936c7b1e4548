"""The ``radtrt`` console script: imports the CLI, then runs it.

Why a module of its own: ``radtrt.cli`` imports torch and every command group when it is imported, a second or
more before ``main`` handles anything, and a Ctrl-C in that time printed a 30-line ``KeyboardInterrupt``
traceback. Here the import is guarded, and an interrupt during it exits 130 as an interrupted command does
(``radtrt.interrupts`` holds it back while a module is being imported).
This module imports nothing heavy itself. (``python -m radtrt.cli`` comes here too, before ``radtrt.cli``'s imports.)
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, what typer and a shell give an interrupted command


def main() -> None:
    from radtrt import interrupts

    interrupts.install()  # an interrupt during the imports below waits for the one in progress (see there)
    try:
        from radtrt.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:  # one held back until an import ended may land outside any command's wrapper
        interrupts.report()  # once: the CLI's own report, if it made one, stands
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
