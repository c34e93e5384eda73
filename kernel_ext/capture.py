"""Record what a claimed cell shows, as the IOPub messages the frontend received.

A skipped cell must look exactly like its first run (issue 25): streams in
the chunks and order they were sent, ``clear_output`` where it came, widget
models opened and updated, ``update_display_data`` for displays of earlier
cells, an ``ipywidgets.Output`` capturing what it captured. Recording what the
cell *wrote* cannot give that (ipykernel buffers stdout and stderr apart and
flushes them on a timer; the frontend, not the kernel, routes output into an
Output widget), so the recorder taps the one place every one of those
messages passes: the kernel's ``Session.send``. It keeps the messages whose
parent is the cell's ``execute_request`` and whose type a frontend renders
(:data:`RECORDED`); replay sends them again (:mod:`.replay`).

The ``execute_result`` is kept apart, as the cell's *result*: a skip returns
it to the display hook, so ``Out[n]`` and ``_`` are set as on a first run.

Without a kernel (terminal IPython) there is no Session: streams are recorded
by wrapping ``sys.stdout.write`` / ``sys.stderr.write`` and displays with the
display publisher's hook, into the same message form.

Everything is size-capped; what does not fit is dropped and counted, and a
skip says how much was lost (in its status output, not in the cell's
streams), so a chatty cell can never blow up the store.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
from typing import Any

from .defaults import OUTPUT_LIMIT

#: IOPub message types a frontend turns into (or applies to) cell output.
RECORDED = frozenset(
    {"stream", "display_data", "update_display_data", "clear_output", "comm_open", "comm_msg", "comm_close"}
)
#: Where the cell's result came is kept as a bare marker (``{"t": "execute_result"}``; the
#: result itself is recorded apart, for the display hook), and ``error`` messages in full: what
#: came after the result or the cell's own error (a figure matplotlib's inline backend shows
#: after the result) must come after it again, and an error shown while the cell went on (an
#: ``Output`` widget shows and swallows one raised in its ``with`` block) is output like any other.
MARKERS = frozenset({"execute_result", "error"})
_MISSING = object()


def _parent_msg_id(parent: Any) -> str | None:
    """The msg_id of a parent given as a whole message or as its header."""
    if not isinstance(parent, dict):
        return None
    header = parent.get("header", parent)
    msg_id = header.get("msg_id") if isinstance(header, dict) else None
    return msg_id if isinstance(msg_id, str) else None


def _encode_buffers(buffers: Any) -> list[str]:
    out: list[str] = []
    for buf in buffers or ():
        try:
            out.append(base64.b64encode(bytes(buf)).decode("ascii"))
        except (TypeError, ValueError):
            out.append("")
    return out


def _state_update(content: dict[str, Any]) -> dict[str, Any] | None:
    """The ``state`` of a widget's ``update`` comm message, or None for any other message."""
    data = content.get("data")
    if not isinstance(data, dict) or data.get("method") != "update" or data.get("buffer_paths"):
        return None
    state = data.get("state")
    return state if isinstance(state, dict) else None


class SessionTap:
    """Wraps one kernel ``Session.send``; hands each recorded message to the recorder of its parent.

    Installed once per session object and kept: with no recorder active the
    wrapper costs one dictionary look-up per message.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.original = session.send
        self.recorders: dict[str, OutputRecorder] = {}
        tap = self

        def send(stream: Any, msg_or_type: Any, content: Any = None, parent: Any = None, *args: Any, **kw: Any) -> Any:
            if tap.recorders:
                tap.observe(msg_or_type, content, parent, kw)
            return tap.original(stream, msg_or_type, content, parent, *args, **kw)

        self.send = send
        session.send = send

    def observe(self, msg_or_type: Any, content: Any, parent: Any, kw: dict[str, Any]) -> None:
        """Record one outgoing message if a recorder waits for its parent (never raises)."""
        try:
            if isinstance(msg_or_type, dict):
                header = msg_or_type.get("header") or {}
                msg_type = header.get("msg_type") or msg_or_type.get("msg_type")
                content = msg_or_type.get("content")
                parent = msg_or_type.get("parent_header")
                metadata = msg_or_type.get("metadata")
                buffers = kw.get("buffers") or msg_or_type.get("buffers")
            else:
                msg_type = msg_or_type
                parent = parent if parent is not None else kw.get("parent")
                metadata = kw.get("metadata")
                buffers = kw.get("buffers")
            if msg_type not in RECORDED and msg_type not in MARKERS:
                return
            recorder = self.recorders.get(_parent_msg_id(parent) or "")
            if recorder is not None:
                recorder.message(str(msg_type), content or {}, metadata, buffers)
        except Exception:  # noqa: BLE001 - recording is best effort, sending is not
            pass


def tap_for(shell: Any) -> SessionTap | None:
    """The :class:`SessionTap` of the shell's kernel session (installed on first use), or None without a kernel."""
    session = getattr(getattr(shell, "kernel", None), "session", None)
    if session is None or not hasattr(session, "send"):
        return None
    tap = getattr(session, "_nbrunbook_tap", None)
    if not isinstance(tap, SessionTap):
        tap = SessionTap(session)
        try:
            session._nbrunbook_tap = tap
        except AttributeError:
            return None
    return tap


class _WriteTee:
    """Wraps one stream's ``write`` (no kernel); restores it exactly on ``remove``."""

    def __init__(self, recorder: OutputRecorder, stream: Any, name: str) -> None:
        self.stream = stream
        self.original = stream.write
        self.saved = stream.__dict__.get("write", _MISSING) if hasattr(stream, "__dict__") else _MISSING
        self.installed = False

        def write(data: Any, *args: Any, **kwargs: Any) -> Any:
            result = self.original(data, *args, **kwargs)
            if isinstance(data, str) and data:
                recorder.message("stream", {"name": name, "text": data}, None, None)
            return result

        self.write = write
        try:
            stream.write = write
        except (AttributeError, TypeError):  # a C-level stream: no stream recording
            return
        self.installed = True

    def remove(self) -> None:
        if not self.installed:
            return
        self.installed = False
        if getattr(self.stream, "write", None) is not self.write:
            return  # someone wrapped it after us and did not unwrap: leave theirs alone
        try:
            if self.saved is _MISSING:
                del self.stream.write
            else:
                self.stream.write = self.saved
        except AttributeError:
            pass


class OutputRecorder:
    """Collects a cell's output messages as JSON-able items, at most ``limit`` bytes in all.

    Each item is ``{"t": msg_type, "c": content}`` plus ``"m"`` (metadata) and
    ``"b"`` (base64 buffers) when there are any. The result is kept apart in
    :attr:`result` (``{"data", "metadata"}``).
    """

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.size = 0
        self.dropped = 0
        self.msg_id: str | None = None
        self._lock = threading.Lock()
        self._tap: SessionTap | None = None
        self._tees: list[_WriteTee] = []
        self._display_pub: Any = None
        #: comm id -> its state update recorded since the last non-comm message (see _merged).
        self._updates: dict[str, dict[str, Any]] = {}

    # --------------------------------------------------------- installation

    def start(self, shell: Any, msg_id: str | None) -> None:
        """Begin recording the messages sent for the execute request ``msg_id``."""
        self.msg_id = msg_id
        tap = tap_for(shell) if msg_id else None
        if tap is not None:
            assert msg_id is not None
            tap.recorders[msg_id] = self
            self._tap = tap
            return
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name, None)
            if stream is not None:
                self._tees.append(_WriteTee(self, stream, name))
        pub = getattr(shell, "display_pub", None)
        if pub is not None and hasattr(pub, "register_hook"):
            pub.register_hook(self._hook)
            self._display_pub = pub

    def stop(self) -> None:
        """Stop recording (idempotent), after the kernel has sent what the cell wrote."""
        if self._tap is not None:
            # ipykernel sends stream text from its IO thread on a timer: flush so it is sent (and seen) now.
            for name in ("stdout", "stderr"):
                try:
                    getattr(sys, name).flush()
                except (AttributeError, OSError, ValueError):
                    pass
            if self.msg_id is not None and self._tap.recorders.get(self.msg_id) is self:
                del self._tap.recorders[self.msg_id]
            self._tap = None
        for tee in reversed(self._tees):
            tee.remove()
        self._tees = []
        if self._display_pub is not None:
            try:
                self._display_pub.unregister_hook(self._hook)
            except (ValueError, AttributeError):
                pass
            self._display_pub = None

    # ------------------------------------------------------------ recording

    def message(self, msg_type: str, content: dict[str, Any], metadata: Any, buffers: Any) -> None:
        """Record one message (the display hook's ``execute_result`` becomes :attr:`result` and a marker)."""
        if msg_type == "execute_result" and not (content.get("transient") or {}).get("display_id"):
            data, md = dict(content.get("data") or {}), dict(content.get("metadata") or {})
            self.result = {"data": data, "metadata": md}
            with self._lock:
                self.items.append({"t": msg_type})
                self._updates.clear()  # shown output: updates after it stay after it
            return
        # (An execute_result with a display_id - sent by the cell itself, for a later update to
        # find - is recorded whole, like a display: the display hook could not carry the id.)
        if msg_type == "comm_msg" and not buffers:
            if self._merged(content):
                return
            state = _state_update(content)
            if state is not None:  # a copy: a later update may be folded into it (see _merged)
                content = {**content, "data": {**content["data"], "state": dict(state)}}
        item: dict[str, Any] = {"t": msg_type, "c": content}
        if metadata:
            item["m"] = metadata
        if buffers:
            item["b"] = _encode_buffers(buffers)
        try:
            size = len(json.dumps(item, default=str))
        except (TypeError, ValueError):
            return
        with self._lock:
            if self.size + size > self.limit:
                room = self.limit - self.size - (size - len(content.get("text", "")))
                if msg_type != "stream" or room <= 0:
                    self.dropped += size
                    return
                # A stream chunk over the limit keeps the part that fits: a flood of output shows its start.
                text = str(content.get("text", ""))
                item["c"] = content = {**content, "text": text[:room]}
                self.dropped += len(text) - room
                size = self.limit - self.size
            self.size += size
            last = self.items[-1] if self.items else None
            if (
                msg_type == "stream"
                and self._tees  # written text (no kernel), not sent chunks: merge as a frontend would
                and last is not None
                and last["t"] == "stream"
                and last["c"].get("name") == content.get("name")
            ):
                last["c"] = {"name": content.get("name"), "text": last["c"].get("text", "") + content.get("text", "")}
            else:
                self.items.append(item)
            if msg_type == "comm_msg" and not buffers and _state_update(content) is not None:
                self._updates[str(content.get("comm_id"))] = item
            elif msg_type != "comm_msg":
                self._updates.clear()

    def _merged(self, content: dict[str, Any]) -> bool:
        """Fold a widget's state update into its update recorded earlier in this run of comm messages.

        A progress bar updated in a loop sends thousands of updates; the
        frontend ends with the last state either way. Only updates with no
        output between them are folded (an Output widget's capture starts and
        ends with an update, and what it captures is output), so the order the
        frontend applies things in is kept.
        """
        state = _state_update(content)
        if state is None or "msg_id" in state:
            return False  # an Output widget's capture starting or ending: never moved
        with self._lock:
            earlier = self._updates.get(str(content.get("comm_id")))
            if earlier is None:
                return False
            folded = _state_update(earlier["c"])
            if folded is None or "msg_id" in folded:
                return False
            size = len(json.dumps(state, default=str))
            if self.size + size > self.limit:
                return False
            folded.update(state)
            self.size += size
            return True

    def _hook(self, msg: dict[str, Any]) -> dict[str, Any]:
        # No kernel session: the display publisher's hook. Must never raise (it runs for user code).
        try:
            msg_type = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            if msg_type in RECORDED:
                self.message(str(msg_type), dict(msg.get("content") or {}), msg.get("metadata"), None)
        except Exception:  # noqa: BLE001 - recording is best effort, showing is not
            pass
        return msg

    def finish(self) -> list[dict[str, Any]]:
        """The recorded messages, in the order they were sent."""
        with self._lock:
            return list(self.items)
