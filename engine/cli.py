"""The ``nbrunbook`` command line (also ``jupyter runbook``).

Each group of subcommands lives in its own module with a ``register(sub)``
function; this module wires them up and turns library errors into one clear
line on stderr with the exit codes of DESIGN.md §6:

0 done · 1 a cell failed · 2 bad input · 3 waiting on another run timed out ·
4 store unavailable · 5 an interrupted step needs a decision.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import (
    InstanceNotFound,
    RunbookError,
    StepBusy,
    StepInterrupted,
    StoreError,
    StoreLocked,
    StoreUnavailable,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3
EXIT_STORE = 4
EXIT_INTERRUPTED = 5

#: Modules contributing subcommands, in help order.
COMMAND_MODULES = [
    "nbrunbook.engine.cli_run",
    "nbrunbook.engine.cli_demo",
    "nbrunbook.engine.cli_read",
    "nbrunbook.engine.cli_dashboard",
    "nbrunbook.engine.cli_server",
    "nbrunbook.engine.cli_upgrade",
]


def exit_code_for(exc: BaseException) -> int:
    """The exit code a library error maps to."""
    if isinstance(exc, StepInterrupted):
        return EXIT_INTERRUPTED
    if isinstance(exc, StepBusy):
        return EXIT_TIMEOUT
    if isinstance(exc, (StoreUnavailable, StoreLocked)):
        return EXIT_STORE
    if isinstance(exc, StoreError):
        return EXIT_STORE
    if isinstance(exc, (InstanceNotFound, RunbookError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (used by the docs test too)."""
    parser = argparse.ArgumentParser(
        prog="nbrunbook",
        description="Run notebooks as durable runbooks: every cell a run-once step.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nbrunbook`` and ``jupyter-runbook``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except RunbookError as exc:
        print(f"nbrunbook: error: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("nbrunbook: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nbrunbook journal ... | head`
        sys.stderr.close()
        return EXIT_OK
    return code


if __name__ == "__main__":  # pragma: no cover - python -m nbrunbook.engine.cli
    sys.exit(main())
