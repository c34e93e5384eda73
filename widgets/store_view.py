"""The store dashboard: every instance, filtered by runbook and status; open one."""

from __future__ import annotations

import threading
from typing import Any

from nbrunbook.engine import model
from nbrunbook.engine.store import Store

from . import render
from .instance import InstanceDashboard

ALL = "(all)"


class StoreDashboard:
    """Lists instances (read-only) and opens an :class:`InstanceDashboard` for one."""

    def __init__(self, store: Store, *, instance: str | None = None, live: bool = True, interval: float = 5.0) -> None:
        import ipywidgets as w

        self.store = store
        self.interval = interval
        self.runbook = w.Dropdown(options=[ALL], value=ALL, description="runbook")
        self.status = w.Dropdown(options=[ALL, *model.STATUSES, "active", "created"], value=ALL, description="status")
        self.choice = w.Dropdown(options=[], description="instance")
        self.open_button = w.Button(description="open", icon="folder-open")
        self.table = w.HTML()
        self.detail = w.VBox()
        self.widget = w.VBox(
            [w.HBox([self.runbook, self.status]), self.table, w.HBox([self.choice, self.open_button]), self.detail]
        )
        self.widget.add_class("nbrunbook-store-dashboard")
        self.current: InstanceDashboard | None = None
        self.summaries: list[model.InstanceSummary] = []
        self.runbook.observe(lambda _: self.refresh(), names="value")
        self.status.observe(lambda _: self.refresh(), names="value")
        self.open_button.on_click(lambda _: self.open(self.choice.value))
        self._stop = threading.Event()
        self.refresh()
        if instance:
            self.open(instance)
        self._thread: threading.Thread | None = None
        if live:
            self._thread = threading.Thread(target=self._loop, name="nbrunbook-store-dashboard", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        """Re-read the instance list with the current filters."""
        everything = self.store.instances()
        runbooks = sorted({s.runbook for s in everything})
        if list(self.runbook.options) != [ALL, *runbooks]:
            keep = self.runbook.value if self.runbook.value in runbooks else ALL
            self.runbook.options = [ALL, *runbooks]
            self.runbook.value = keep
        self.summaries = [
            s
            for s in everything
            if (self.runbook.value == ALL or s.runbook == self.runbook.value)
            and (self.status.value == ALL or s.status == self.status.value)
        ]
        self.table.value = render.instances_table(self.summaries)
        ids = [s.instance_id for s in self.summaries]
        if list(self.choice.options) != ids:
            self.choice.options = ids

    def open(self, instance_id: Any) -> InstanceDashboard | None:
        """Show one instance's dashboard below the list."""
        if not instance_id:
            return None
        if self.current is not None:
            self.current.stop()
        if instance_id in self.choice.options:
            self.choice.value = instance_id
        self.current = InstanceDashboard(self.store, str(instance_id))
        self.detail.children = [self.current.widget]
        return self.current

    def stop(self) -> None:
        """Stop the live updates (of the list and of the open instance)."""
        self._stop.set()
        if self.current is not None:
            self.current.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the store may be restarting; next tick
                pass

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
