"""Show a skipped cell again: its status, then exactly what its first run showed.

Replay runs *as the skipped cell's body* (the guard's AST transformer puts a
call here in place of the user's code). In a kernel it sends the cell's
recorded IOPub messages (:mod:`.capture`) again, in order, with the current
request as their parent, so the frontend applies them as it did the first
time: stream chunks, ``clear_output``, displays and ``update_display_data``,
widget ``comm_open`` / ``comm_msg`` (so widget views render again and an
``Output`` widget captures what it captured). Two things are rewritten, since
they name the first run: the old request's msg_id (an ``Output`` widget's
``msg_id`` says which request it captures) becomes the current one, and each
widget model gets a fresh comm id (Run All twice in one kernel must not open
a model whose id is still live), used consistently in later cells.

The recorded result is returned to the display hook, so it is ``Out[n]``.

The cell's *status* - already done in which run, by whom, what was restored
and what not - is an output of its own, a display of :data:`STATUS_MIME` with
a ``text/plain`` line, never part of the cell's streams: runners, nbval and
nbdime can tell it apart. It is the cell's first output, and is shown again
after a replayed ``clear_output`` (outside an ``Output`` widget) so it stays
in sight; a ``clear_output(wait=True)`` is left pending as the first run left
it.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from nbrunbook.engine.keys import parse_owner
from nbrunbook.engine.model import SKIPPED, EncodedValue, StepState

if TYPE_CHECKING:
    from .session import Target

#: The MIME type of a skipped cell's status output (a JSON object; ``text/plain`` beside it).
STATUS_MIME = "application/vnd.nbrunbook.status+json"
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_MODEL_PREFIX = "IPY_MODEL_"
#: Recorded comm id -> the id it was last replayed under in this kernel (see module doc).
_COMM_IDS: dict[str, str] = {}


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
    """One line: which cell, done in which run, by whom, when, how long (DESIGN.md §5). Plain text, no emoji."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.finished_at)) if state.finished_at else "?"
    run = state.run_id or "?"
    if this_run and run == this_run:
        run += " (this session)"
    if state.status == SKIPPED:
        head = f"{label}: skipped by decision (resolve --skip) at {when}, run {run}"
    elif state.owner is None:
        head = f"{label}: marked done by decision (resolve --done) at {when}, run {run}"
    else:
        head = (
            f"{label}: already done in run {run} by {who(state.owner)} at {when}, "
            f"took {_took(state.duration)}; not run again"
        )
    if restored:
        head += "; restored " + ", ".join(restored)
    if note:
        head += "; " + note
    return head


def status_bundle(
    label: str,
    state: StepState,
    run_id: str,
    restored: list[str],
    not_restored: Mapping[str, str],
    notes: list[str],
) -> dict[str, Any]:
    """The data of a skipped cell's status output: :data:`STATUS_MIME` and its ``text/plain`` line.

    ``not_restored`` maps each value the cell assigned but that is not back
    to why; ``notes`` are the other remarks (changed source, output over the
    limit). The line says all of it once, after ``nbrunbook:`` so a reader
    of a plain-text output knows who speaks.
    """
    if state.status == SKIPPED:
        kind = "skipped"
    elif state.owner is None:
        kind = "marked-done"
    else:
        kind = "done"
    info = {
        "cell": label,
        "status": kind,
        "run": state.run_id,
        "this_session": bool(run_id and state.run_id == run_id),
        "by": who(state.owner) if state.owner else None,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(state.finished_at)) if state.finished_at else None,
        "took": state.duration,
        "restored": list(restored),
        "not_restored": dict(not_restored),
        "notes": list(notes),
    }
    said = [unsaved_advice(not_restored), *notes]
    text = status_line(label, state, this_run=run_id, restored=restored, note="; ".join(n for n in said if n))
    return {STATUS_MIME: info, "text/plain": "nbrunbook: " + text}


# ------------------------------------------------------------------ replay


def _rename(value: Any, ids: Mapping[str, str]) -> Any:
    """``value`` with every string that is a key of ``ids`` (or ``IPY_MODEL_`` + key) renamed."""
    if isinstance(value, str):
        if value in ids:
            return ids[value]
        if value.startswith(_MODEL_PREFIX) and value[len(_MODEL_PREFIX) :] in ids:
            return _MODEL_PREFIX + ids[value[len(_MODEL_PREFIX) :]]
        return value
    if isinstance(value, dict):
        return {k: _rename(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, ids) for v in value]
    return value


def _legacy(outputs: list[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Messages and result from a record written before ``v`` 2 (``outputs`` items)."""
    messages: list[dict[str, Any]] = []
    result = None
    for item in outputs:
        kind = item.get("type")
        if kind in ("stream", "note"):
            name = "stderr" if item.get("name") == "stderr" else "stdout"
            messages.append({"t": "stream", "c": {"name": name, "text": str(item.get("text", ""))}})
        elif kind == "display":
            content = {"data": dict(item.get("data") or {}), "metadata": dict(item.get("metadata") or {})}
            messages.append({"t": "display_data", "c": {**content, "transient": {}}})
        elif kind == "result":
            result = {"data": dict(item.get("data") or {}), "metadata": dict(item.get("metadata") or {})}
    return messages, result


class Replayer:
    """Sends one skipped cell's status and recorded messages to the frontend (see module doc)."""

    def __init__(self, shell: Any, status: dict[str, Any], recorded_msg_id: str | None) -> None:
        self.shell = shell
        self.status = status
        self.kernel = getattr(shell, "kernel", None)
        self.parent: Any = None
        if self.kernel is not None:
            try:
                self.parent = self.kernel.get_parent("shell")
            except (AttributeError, TypeError, LookupError):
                self.parent = getattr(self.kernel, "_parent_header", None)
        self.ids: dict[str, str] = {}
        current = (self.parent or {}).get("header", {}).get("msg_id") if isinstance(self.parent, dict) else None
        if recorded_msg_id and current:
            self.ids[recorded_msg_id] = current
        self.capturing: set[str] = set()  # Output widgets capturing this request's output now
        self.status_due = False  # a clear_output(wait=True) waits for the next output

    # --------------------------------------------------------------- sending

    def _send(self, msg_type: str, content: dict[str, Any], metadata: Any = None, buffers: Any = None) -> None:
        kernel = self.kernel
        if kernel is None or getattr(kernel, "session", None) is None:
            self._send_plain(msg_type, content)
            return
        if msg_type == "stream":
            topic = f"stream.{content.get('name', 'stdout')}"
        elif msg_type.startswith("comm_"):
            topic = f"comm-{content.get('comm_id', '')}"
        else:
            topic = "display_data"
        kernel.session.send(
            kernel.iopub_socket,
            msg_type,
            content,
            parent=self.parent,
            ident=topic.encode(),
            metadata=dict(metadata or {}),
            buffers=buffers or None,
        )

    @staticmethod
    def _send_plain(msg_type: str, content: dict[str, Any]) -> None:
        """No kernel (terminal IPython): streams to the streams, displays through IPython."""
        if msg_type == "stream":
            stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
            stream.write(str(content.get("text", "")))
        elif msg_type == "display_data":
            from IPython.display import publish_display_data

            publish_display_data(dict(content.get("data") or {}), metadata=dict(content.get("metadata") or {}))

    def show_status(self) -> None:
        """The status output (a display of its own, never in the cell's streams)."""
        self.status_due = False
        if self.kernel is None:
            sys.stdout.write(str(self.status.get("text/plain", "")) + "\n")
            return
        self._send("display_data", {"data": self.status, "metadata": {}, "transient": {}})

    def _widget_ids(self, item: dict[str, Any]) -> dict[str, Any]:
        """The message's content with the first run's ids replaced (see module doc)."""
        msg_type, content = item["t"], item.get("c") or {}
        if msg_type == "comm_open":
            old = str(content.get("comm_id", ""))
            _COMM_IDS[old] = uuid.uuid4().hex
        elif not msg_type.startswith("comm_"):
            data = content.get("data")
            if not (isinstance(data, dict) and _WIDGET_VIEW in data):
                return dict(content)
        ids = {**_COMM_IDS, **self.ids}
        renamed: dict[str, Any] = _rename(content, ids)
        return renamed

    def result(self, recorded: Mapping[str, Any]) -> RecordedResult:
        """The recorded result, naming the replayed widget models (the display hook sends it)."""
        content = self._widget_ids({"t": "execute_result", "c": dict(recorded)})
        return RecordedResult(content.get("data") or {}, content.get("metadata"))

    def replay(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the recorded messages again, in order, up to the result or the error.

        Returns the messages recorded after that marker: they must follow the
        result (or error), which the display hook (or the raise) shows after
        this returns - send them with :meth:`replay` once the cell is over.
        """
        for stream in (sys.stdout, sys.stderr):  # what this request wrote so far goes first
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        for at, item in enumerate(messages):
            msg_type = str(item.get("t", ""))
            if msg_type in ("execute_result", "error"):
                return [m for m in messages[at + 1 :] if m.get("t") not in ("execute_result", "error")]
            content = self._widget_ids(item)
            if self.status_due and not self.capturing and msg_type in ("stream", "display_data"):
                self.show_status()  # the output a pending clear_output(wait=True) waited for
            buffers = [base64.b64decode(b) for b in item.get("b") or ()]
            self._send(msg_type, content, item.get("m"), buffers)
            if msg_type == "comm_msg":
                state = (content.get("data") or {}).get("state") or {}
                if isinstance(state, dict) and "msg_id" in state:
                    comm = str(content.get("comm_id", ""))
                    if state["msg_id"]:
                        self.capturing.add(comm)
                    else:
                        self.capturing.discard(comm)
            elif msg_type == "clear_output" and not self.capturing:
                if content.get("wait"):
                    self.status_due = True
                else:
                    self.show_status()
        return []

    def finish(self, more: bool) -> None:
        """Before a result or an error (``more``): they end a pending wait too, so the status comes first.

        Without either, a pending ``clear_output(wait=True)`` stays pending, as
        after the first run, and the status shown first is still in sight.
        """
        if more and self.status_due and not self.capturing:
            self.show_status()


def _after_cell(shell: Any, send: Callable[[], object]) -> None:
    """Call ``send`` once, when the current cell is over (after its result or error is shown)."""
    events = getattr(shell, "events", None)
    if events is None:
        send()
        return

    def once(result: Any = None) -> None:
        events.unregister("post_run_cell", once)
        send()

    events.register("post_run_cell", once)


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
    shell: Any,
    user_ns: MutableMapping[str, Any],
    target: Target,
    state: StepState,
    run_id: str,
    values: Mapping[str, EncodedValue],
    record: Mapping[str, Any],
    note: str,
) -> Callable[[], RecordedResult | None]:
    """The body of a skipped cell: restore its values, show its status, replay its messages.

    A cell recorded done *with* an error (nbclient's ``raises-exception``, or
    a ``SystemExit`` that ended the run) raises that error again after its
    outputs, so the reply is the same error as on the first run: nbclient
    carries on past an expected error, and stops at ``SystemExit`` again.
    """
    from . import saved

    def run() -> RecordedResult | None:
        restored, problems = saved.restore(user_ns, values, pickle_names=target.spec.pickle_names)
        not_restored = dict(record.get("unsaved") or {})
        for problem in problems:
            name, _, why = problem.partition(" not restored: ")
            not_restored[name] = why or problem
        notes = [note] if note else []
        if record.get("dropped"):
            notes.append(
                f"{record['dropped']} bytes of its output were not recorded (limit {record.get('limit', '?')} "
                "bytes per cell) and are not shown"
            )
        if "v" in record:
            messages = list(record.get("messages") or [])
            result = record.get("result")
        else:
            messages, result = _legacy(list(record.get("outputs") or []))
        status = status_bundle(target.label, state, run_id, restored, not_restored, notes)
        player = Replayer(shell, status, record.get("msg_id"))
        player.show_status()
        tail = player.replay(messages)
        kept = record.get("error")
        player.finish(isinstance(kept, Mapping) or isinstance(result, Mapping))
        if tail:
            _after_cell(shell, lambda: player.replay(tail))
        if not isinstance(kept, Mapping):
            return player.result(result) if isinstance(result, Mapping) else None
        from .outcome import rebuild
        from .record import SYSTEM_EXIT

        # No result to lose: a cell that raised (or whose display raised) recorded none.
        raise rebuild(kept, record.get(SYSTEM_EXIT), ended_run=SYSTEM_EXIT in record)

    return run
