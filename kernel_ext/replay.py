"""Show a skipped cell again: its status line, recorded outputs and result.

Replay runs *as the skipped cell's body* (the guard's AST transformer puts a
call here in place of the user's code), so outputs land in the cell in the
order they were recorded, and the recorded result becomes the cell's
``execute_result`` through the normal display hook.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from nbrunbook.engine.keys import parse_owner
from nbrunbook.engine.model import SKIPPED, EncodedValue, StepState

if TYPE_CHECKING:
    from .session import Target

#: Every status line of a skipped cell starts with this, so clients can recognise (or drop) it.
STATUS_PREFIX = "⏭ "


class RecordedResult:
    """The recorded ``execute_result`` of a skipped cell, shown again by the display hook."""

    def __init__(self, data: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        self.data = dict(data)
        self.metadata = dict(metadata or {})

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        text = self.data.get("text/plain")
        return str(text) if text is not None else "<recorded output>"


def who(owner: str | None) -> str:
    """``user@host (pid N)`` from an owner id."""
    if not owner:
        return "a person (resolve)"
    parsed = parse_owner(owner)
    if parsed is None:
        return owner
    user, host, pid, _ = parsed
    return f"{user}@{host} (pid {pid})"


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def status_line(
    label: str, state: StepState, *, this_run: str | None = None, restored: list[str] | None = None, note: str = ""
) -> str:
    """One line: which cell, done in which run, by whom, when, how long (DESIGN.md §5)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.finished_at)) if state.finished_at else "?"
    run = state.run_id or "?"
    if this_run and run == this_run:
        run += " (this session)"
    if state.status == SKIPPED:
        head = f"{STATUS_PREFIX}{label}: skipped by decision (resolve --skip) at {when}, run {run}"
    elif state.owner is None:
        head = f"{STATUS_PREFIX}{label}: marked done by decision (resolve --done) at {when}, run {run}"
    else:
        head = (
            f"{STATUS_PREFIX}{label}: already done in run {run} by {who(state.owner)} at {when}, "
            f"took {_took(state.duration)}; not run again"
        )
    if restored:
        head += "; restored " + ", ".join(restored)
    if note:
        head += "; " + note
    return head


def show_status(line: str) -> None:
    """Write a status line to stdout (a stream write costs far less than a display message)."""
    sys.stdout.write(line + "\n")


def replay(outputs: list[Mapping[str, Any]]) -> RecordedResult | None:
    """Write the recorded streams, publish the displays; return the result to display last.

    No explicit flushes: ipykernel's display publisher flushes the streams
    before each display, which keeps the recorded order.
    """
    from IPython.display import publish_display_data

    result: RecordedResult | None = None
    for item in outputs:
        kind = item.get("type")
        if kind in ("stream", "note"):
            stream = sys.stderr if item.get("name") == "stderr" else sys.stdout
            stream.write(str(item.get("text", "")))
        elif kind == "display":
            publish_display_data(dict(item.get("data", {})), metadata=dict(item.get("metadata") or {}))
        elif kind == "result":
            result = RecordedResult(item.get("data", {}), item.get("metadata"))
    return result


def unsaved_advice(unsaved: Mapping[str, str]) -> str:
    """What the skip line says about values the cell assigned but that were not saved.

    Live handles (files, sockets, clients) are named together with how to get
    them back - a cell marked ``always`` - never with a pickle hint; other
    values keep their own reason.
    """
    from .saved import REBUILD

    handles = [name for name, why in unsaved.items() if REBUILD in why]
    others = [f"{name} ({why})" for name, why in unsaved.items() if REBUILD not in why]
    parts = []
    if handles:
        them = "it" if len(handles) == 1 else "them"
        parts.append(
            f"{', '.join(handles)} (open {'resource' if len(handles) == 1 else 'resources'}, which cannot be saved: "
            f"re-create {them} in a cell marked `#| runbook: always`)"
        )
    parts.extend(others)
    return "not restored: " + "; ".join(parts) if parts else ""


def skipper(
    user_ns: MutableMapping[str, Any],
    target: Target,
    state: StepState,
    run_id: str,
    values: Mapping[str, EncodedValue],
    record: Mapping[str, Any],
    note: str,
    warn: Callable[[str], None],
) -> Callable[[], RecordedResult | None]:
    """The body of a skipped cell: restore its values, say so in one line, replay its outputs.

    A cell recorded done *with* an error (nbclient's ``raises-exception``, or
    a ``SystemExit`` that ended the run) raises that error again after its
    outputs, so the reply is the same error as on the first run: nbclient
    carries on past an expected error, and stops at ``SystemExit`` again.
    """
    from . import saved

    def run() -> RecordedResult | None:
        restored, problems = saved.restore(user_ns, values, pickle_names=target.spec.pickle_names)
        detail = unsaved_advice(record.get("unsaved") or {})
        show_status(status_line(target.label, state, this_run=run_id, restored=restored, note=detail))
        if note:
            warn(note)
        for problem in problems:
            warn(problem)
        result = replay(record.get("outputs") or [])
        kept = record.get("error")
        if not isinstance(kept, Mapping):
            return result
        from .outcome import rebuild
        from .record import SYSTEM_EXIT

        # No result to lose: a cell that raised (or whose display raised) recorded none.
        raise rebuild(kept, record.get(SYSTEM_EXIT), ended_run=SYSTEM_EXIT in record)

    return run
