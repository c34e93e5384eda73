"""Record what a claimed cell shows: stdout/stderr, display data and its result.

Streams are recorded by wrapping the ``write`` method of ``sys.stdout`` /
``sys.stderr`` in place (the way IPython 9 tees them for its history) rather
than replacing the objects, because ipykernel and libraries check the stream
classes. Display data is recorded with the display publisher's ``register_hook``
(ipykernel), which sees each message just before it is sent. Output that
``%%capture`` swallows is not recorded: it was never shown.

Everything is size-capped; what does not fit is dropped and replaced by a
note, so a chatty cell can never blow up the store.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from .defaults import OUTPUT_LIMIT

_MISSING = object()
# Widget views refer to models of one kernel session; replaying them after a
# restart shows an error, so they are recorded only as their text fallback.
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class _WriteTee:
    """Wraps one stream's ``write``; restores it exactly on ``remove``."""

    def __init__(self, recorder: OutputRecorder, stream: Any, name: str) -> None:
        self.recorder = recorder
        self.stream = stream
        self.name = name
        self.original = stream.write
        self.saved = stream.__dict__.get("write", _MISSING) if hasattr(stream, "__dict__") else _MISSING
        self.installed = False

        def write(data: Any, *args: Any, **kwargs: Any) -> Any:
            result = self.original(data, *args, **kwargs)
            if isinstance(data, str) and data:
                self.recorder.stream(self.name, data)
            return result

        self.write = write
        try:
            stream.write = write
        except (AttributeError, TypeError):  # a C-level stream (terminal IPython): no stream recording
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
    """Collects a cell's outputs as JSON-able items, at most ``limit`` bytes in all.

    Items: ``{"type": "stream", "name": "stdout", "text": ...}``,
    ``{"type": "display", "data": {...}, "metadata": {...}}``,
    ``{"type": "result", "data": {...}, "metadata": {...}}`` and
    ``{"type": "note", "text": ...}`` (for what was dropped).
    """

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.items: list[dict[str, Any]] = []
        self.size = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._tees: list[_WriteTee] = []
        self._display_pub: Any = None
        self._display_ids: dict[str, dict[str, Any]] = {}

    # --------------------------------------------------------- installation

    def start(self, shell: Any) -> None:
        """Begin recording the shell's streams and displays."""
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name, None)
            if stream is not None:
                self._tees.append(_WriteTee(self, stream, name))
        pub = getattr(shell, "display_pub", None)
        if pub is not None and hasattr(pub, "register_hook"):
            pub.register_hook(self._hook)
            self._display_pub = pub

    def stop(self) -> None:
        """Stop recording (idempotent). Text is recorded when written, so no flush is needed."""
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

    def _fits(self, size: int) -> bool:
        if self.size + size > self.limit:
            self.dropped += size
            return False
        self.size += size
        return True

    def stream(self, name: str, text: str) -> None:
        """Record stream text (merged with the previous item of the same stream)."""
        with self._lock:
            if not self._fits(len(text)):
                return
            last = self.items[-1] if self.items else None
            if last is not None and last["type"] == "stream" and last["name"] == name:
                last["text"] += text
            else:
                self.items.append({"type": "stream", "name": name, "text": text})

    def display(self, data: dict[str, Any], metadata: dict[str, Any] | None, kind: str = "display") -> None:
        """Record a display bundle (or the cell's result with ``kind='result'``)."""
        data = dict(data)
        if _WIDGET_MIME in data and len(data) > 1:
            del data[_WIDGET_MIME]
        try:
            size = len(json.dumps(data, default=str)) + len(json.dumps(metadata or {}, default=str))
        except (TypeError, ValueError):
            return
        with self._lock:
            if not self._fits(size):
                return
            item = {"type": kind, "data": data, "metadata": dict(metadata or {})}
            self.items.append(item)
        return

    def _hook(self, msg: dict[str, Any]) -> dict[str, Any]:
        # Must never raise: it runs inside the display publisher for user code.
        try:
            msg_type = msg.get("msg_type") or msg.get("header", {}).get("msg_type")
            content = msg.get("content", {})
            if msg_type == "display_data":
                self.display(content.get("data", {}), content.get("metadata"))
                display_id = (content.get("transient") or {}).get("display_id")
                if display_id and self.items and self.items[-1]["type"] == "display":
                    self._display_ids[display_id] = self.items[-1]
            elif msg_type == "update_display_data":
                display_id = (content.get("transient") or {}).get("display_id")
                target = self._display_ids.get(display_id) if display_id else None
                if target is not None:
                    target["data"] = dict(content.get("data", {}))
                    target["metadata"] = dict(content.get("metadata") or {})
            elif msg_type == "clear_output":
                with self._lock:
                    self.items = []
                    self.size = 0
                    self._display_ids.clear()
        except Exception:  # noqa: BLE001 - recording is best effort, showing is not
            pass
        return msg

    def finish(self) -> list[dict[str, Any]]:
        """The recorded items, with a note if anything was dropped."""
        with self._lock:
            items = list(self.items)
            if self.dropped:
                items.append(
                    {
                        "type": "note",
                        "text": f"[nbrunbook: {self.dropped} bytes of output were not recorded "
                        f"(limit {self.limit} bytes per cell)]\n",
                    }
                )
            return items
