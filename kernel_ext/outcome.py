"""A claimed cell's outcome, decided the way the kernel's execute reply decides it.

The step's outcome must match what the frontend (JupyterLab, nbclient,
papermill) sees, never whether the guard's own code path saw an exception
(DESIGN.md §3). ipykernel's ``do_execute`` answers ``status: error`` when
``ExecutionResult.success`` is false *or* a traceback was shown while the
result was being displayed (``shell._last_traceback_during_displayhook``: a
``_repr_*_`` or a display formatter that raised) - then ``error_in_exec`` is
None and the real exception is only in ``sys.last_value``.

From that error:

* none -> ``done``;
* after a requested interrupt -> ``interrupted`` (the cell was cut off);
* ``SystemExit`` with code 0 or None -> ``done``, an early successful end of
  the instance (papermill's rule), remembered so a skip ends the run again;
* the cell is tagged ``raises-exception`` (nbclient's tag) -> ``done`` with
  the error kept, so a skip shows and raises it again;
* anything else -> ``failed``.
"""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: IPython warns this (to stderr, while the cell's output is recorded) after a SystemExit in a cell.
EXIT_NOTICE = "To exit: use 'exit', 'quit', or Ctrl-D."

DONE = "done"
FAILED = "failed"
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Outcome:
    """What to record for a claimed cell."""

    status: str
    error: BaseException | None = None
    #: The error kept in a done step's record (``raises-exception``, ``SystemExit``): ename, evalue, traceback.
    kept: Mapping[str, Any] | None = None
    #: ``SystemExit`` code of a successful early end (0 or None), when ``ended_run``.
    exit_code: int | None = None
    ended_run: bool = False


def reply_error(shell: Any, result: Any) -> BaseException | None:
    """The error the execute reply for this cell carries (None when its status is ok)."""
    if result is None:
        # ipykernel cancelled a top-level `await` cell and gave post_run_cell no result.
        import asyncio

        return asyncio.CancelledError("the cell was cancelled")
    error = result.error_before_exec or result.error_in_exec
    if error is not None:
        return error
    if getattr(shell, "_last_traceback_during_displayhook", False):
        shown = getattr(sys, "last_value", None)  # set by showtraceback for the display error
        if isinstance(shown, BaseException):
            return shown
        return RuntimeError("an error was raised while the cell's result was displayed")
    return None


def _clean_exit(error: BaseException) -> bool:
    return isinstance(error, SystemExit) and error.code in (0, None)


def decide(shell: Any, error: BaseException | None, *, interrupted: bool, raises_expected: bool) -> Outcome:
    """The outcome of a claimed cell whose reply carries ``error`` (see the module doc)."""
    if error is None:
        return Outcome(DONE)
    if interrupted:
        return Outcome(INTERRUPTED, error)
    if _clean_exit(error):
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else None
        return Outcome(DONE, error, kept=describe(shell, error), exit_code=code, ended_run=True)
    if raises_expected:
        return Outcome(DONE, error, kept=describe(shell, error))
    return Outcome(FAILED, error)


def describe(shell: Any, error: BaseException) -> dict[str, Any]:
    """ename, evalue and the traceback the kernel showed (its ``_last_traceback``), as in the reply."""
    stb = getattr(shell, "_last_traceback", None)
    traceback = [str(line) for line in stb] if isinstance(stb, list) else []
    return {"ename": type(error).__name__, "evalue": str(error)[:2000], "traceback": traceback[-200:]}


def rebuild(kept: Mapping[str, Any], exit_code: Any = None, ended_run: bool = False) -> BaseException:
    """The recorded error again, to raise from a skipped cell so its reply matches the first run's.

    ``SystemExit`` is raised as such (IPython shows it and the reply says
    ``SystemExit`` as before). Any other error is an instance of the builtin
    class of that name, or of a class made with that name, carrying the
    recorded evalue and rendering the recorded traceback via
    ``_render_traceback_`` - the user's exception class may not be importable.
    """
    ename = str(kept.get("ename") or "Exception")
    evalue = str(kept.get("evalue") or "")
    if ended_run:
        return SystemExit() if evalue == "" else SystemExit(exit_code)
    exc: BaseException | None = None
    cls = getattr(builtins, ename, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(evalue)
        except Exception:  # noqa: BLE001 - a builtin with another signature: made below
            exc = None
    if exc is None or str(exc) != evalue:  # KeyError quotes its argument, for one
        exc = type(ename, (Exception,), {"__module__": "builtins"})(evalue)
    traceback = [str(line) for line in kept.get("traceback") or []]
    if traceback:
        exc._render_traceback_ = lambda: list(traceback)  # type: ignore[union-attr]
    return exc


def without_exit_notice(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop IPython's "To exit: ..." warning from a SystemExit cell's recorded stderr messages.

    The skip raises SystemExit again and IPython warns again itself (as its
    warning filter decides, just as if the cell ran again); replaying the
    recorded one too would show it twice.
    """
    for item in reversed(messages):
        content = item.get("c") or {}
        if item.get("t") != "stream" or content.get("name") != "stderr":
            continue
        text = str(content.get("text", ""))
        at = text.rfind("UserWarning: " + EXIT_NOTICE)  # the line `warnings` shows, not the source under it
        if at < 0:
            break
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end + 1
        if text.startswith("  ", end):  # the source line `warnings` prints under it
            nxt = text.find("\n", end)
            end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + text[end:]
        if not text:
            return [m for m in messages if m is not item]
        item["c"] = {**content, "text": text}
        break
    return messages
