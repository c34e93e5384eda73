"""The instance dashboard: progress, per-cell table, branch grid, journal tail.

Live: a background thread wakes when the store pushes new events (journal
subscription) or every few seconds, folds only the new events into the view
(``seq > last``) and re-renders at most once per ``interval`` seconds, so a
10,000-branch fan-out costs a handful of widget updates, not thousands.
"""

from __future__ import annotations

import threading
from typing import Any

from nbrunbook.engine.store import Store

from . import render
from .model import InstanceView


class InstanceDashboard:
    """An ipywidgets dashboard of one instance (display it, or use ``.widget``)."""

    def __init__(
        self, store: Store, instance_id: str, *, live: bool = True, interval: float = 0.5, tail: int = 12
    ) -> None:
        import ipywidgets as w

        self.view = InstanceView(store, instance_id, tail=tail)
        self.interval = interval
        self.renders = 0
        self.header = w.HTML()
        self.progress = w.IntProgress(min=0, max=1, value=0, bar_style="info", layout=w.Layout(width="50%"))
        self.label = w.HTML()
        self.cells = w.HTML()
        self.fanouts = w.HTML()
        self.journal = w.HTML()
        title = w.HTML("<b>branches</b>")
        jtitle = w.HTML("<b>journal</b>")
        self.widget = w.VBox(
            [self.header, w.HBox([self.progress, self.label]), self.cells, title, self.fanouts, jtitle, self.journal]
        )
        self.widget.add_class("nbrunbook-dashboard")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        self.render()
        if live:
            self.start()

    # ------------------------------------------------------------ updates

    def refresh(self) -> int:
        """Fold in the events committed since the last refresh and re-render; returns their number."""
        with self._lock:
            n = self.view.refresh()
            if n:
                self.render()
            return n

    def render(self) -> None:
        """Push the view into the widgets (traitlets send only what changed)."""
        view = self.view
        counts = view.counts()
        self.header.value = render.header(view)
        self.progress.max = max(1, counts["total"])
        self.progress.value = counts["finished"]
        self.progress.bar_style = (
            "danger"
            if counts["failed"] or counts["interrupted"]
            else "success"
            if counts["total"] and counts["finished"] == counts["total"]
            else "info"
        )
        self.label.value = render.progress_label(view)
        self.cells.value = render.cells_table(view)
        self.fanouts.value = render.fanouts(view)
        self.journal.value = render.journal_tail(view)
        self.renders += 1

    def start(self) -> None:
        """Follow the store live (idempotent)."""
        if self._thread is not None:
            return
        try:
            self._unsubscribe = self.view.store.subscribe(
                self.view.instance_id, lambda events: self._wake.set(), since_seq=self.view.last_seq
            )
        except Exception:  # noqa: BLE001 - a store without push still works by polling
            self._unsubscribe = None
        self._thread = threading.Thread(target=self._loop, name="nbrunbook-dashboard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following the store."""
        self._stop.set()
        self._wake.set()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=max(2.0, self.interval * 4))
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the store may be closing; try again next tick
                pass
            # Throttle: at most one render per interval, whatever the event rate.
            self._stop.wait(self.interval)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
