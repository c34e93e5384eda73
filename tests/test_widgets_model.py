"""Dashboard widgets against scripted journals on a real store, with a recording
dummy comm at the protocol edge (no kernel, no frontend)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import comm
import pytest

from conftest import owner
from nbrunbook.engine.keys import branch_path
from nbrunbook.engine.model import ClaimOutcome, ManifestCell
from nbrunbook.engine.store import Store
from nbrunbook.widgets import InstanceDashboard, StoreDashboard
from nbrunbook.widgets.model import InstanceView

A = owner("alice")


class RecordingComm:
    """Stands in for a kernel comm: records every message a widget sends."""

    sent: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.comm_id = kwargs.get("comm_id") or f"c{len(RecordingComm.sent)}"
        self.kernel = "a kernel"  # ipywidgets only sends when the comm has one

    def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        RecordingComm.sent.append(data or {})

    def on_msg(self, callback: Any) -> None:
        pass

    def on_close(self, callback: Any) -> None:
        pass

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def recording_comm(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RecordingComm]]:
    RecordingComm.sent = []
    monkeypatch.setattr(comm, "create_comm", lambda **kw: RecordingComm(**kw))
    yield RecordingComm


def _instance(store: Store, iid: str = "i1", cells: int = 4) -> None:
    manifest = store.pin_manifest(
        "deploy",
        [ManifestCell("setup", 0, kind="always")]
        + [ManifestCell(f"c{i}", i + 1, name=f"step {i}") for i in range(cells)],
    )
    store.open_instance("deploy", iid, {"env": "prod"}, manifest_version=manifest.version, owner=A, run_id="r1")


def _run(store: Store, iid: str, cell: str, outcome: str = "done") -> None:
    c = store.claim(iid, f"cell/{cell}", owner=A, run_id="r1")
    assert c.outcome is ClaimOutcome.CLAIMED
    if outcome == "done":
        store.complete(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r1")
    elif outcome == "failed":
        store.fail(iid, c.step_key, owner=A, epoch=c.state.epoch, run_id="r1", error={"type": "ValueError"})


def test_done_instance(store: Store) -> None:
    _instance(store)
    for i in range(4):
        _run(store, "i1", f"c{i}")
    d = InstanceDashboard(store, "i1", live=False)
    assert (d.progress.value, d.progress.max, d.progress.bar_style) == (4, 4, "success")
    assert d.cells.value.count('data-status="done"') == 4
    assert 'data-status="always"' in d.cells.value
    assert "4/4 done" in d.label.value and "prod" in d.header.value
    assert "done" in d.journal.value and "cell/c3@1" in d.journal.value
    assert any(m.get("method") == "update" or "state" in m for m in RecordingComm.sent)


def test_failed_and_interrupted_counts(store: Store) -> None:
    _instance(store)
    _run(store, "i1", "c0")
    _run(store, "i1", "c1", "failed")
    _run(store, "i1", "c2", "running")
    d = InstanceDashboard(store, "i1", live=False)
    assert d.view.status == "running"
    assert "1 running" in d.label.value and "1 failed" in d.label.value
    store.release_owner(A, reason="kernel died")
    assert d.refresh() == 1  # only the new event was read
    assert d.view.status == "interrupted" and "1 interrupted" in d.label.value
    assert d.progress.value == 1 and d.progress.bar_style == "danger"
    assert 'data-cell="c2" data-status="interrupted"' in d.cells.value


def test_fanout_of_1000_with_3_failures(store: Store) -> None:
    _instance(store)
    parent = store.claim("i1", "cell/c0", owner=A, run_id="r1")
    paths = [branch_path(parent.step_key, "check", str(i)) for i in range(1000)]
    view = InstanceView(store, "i1")
    claims = store.claim_many("i1", paths, owner=A, run_id="r1")
    for i, c in enumerate(claims):
        if i in (7, 500, 999):
            store.fail("i1", c.step_key, owner=A, epoch=c.state.epoch, run_id="r1", error={}, wait=False)
        else:
            store.complete("i1", c.step_key, owner=A, epoch=c.state.epoch, run_id="r1", wait=False)
    store.flush()
    assert view.refresh() == 2000
    fan = view.fanouts["cell/c0@1"]
    assert fan.counts()["done"] == 997 and fan.counts()["failed"] == 3
    assert [k.rsplit("/", 1)[1] for k in fan.failed_keys()] == ["check[500]", "check[7]", "check[999]"]
    d = InstanceDashboard(store, "i1", live=False)  # a fresh snapshot agrees with the folded view
    assert d.view.summary()["fanouts"] == view.summary()["fanouts"]
    assert "1000 branches" in d.fanouts.value and "997 done" in d.fanouts.value and "3 failed" in d.fanouts.value
    assert "check[500]" in d.fanouts.value


def test_rerun_and_resolve_fold_like_the_store(store: Store) -> None:
    _instance(store)
    view = InstanceView(store, "i1")
    _run(store, "i1", "c0")
    store.rerun("i1", "cell/c0", owner=A, run_id="r2")
    _run(store, "i1", "c1", "running")
    store.release_owner(A, reason="gone")
    store.resolve("i1", "cell/c1", "skip", owner=A, run_id="r3")
    view.refresh()
    fresh = InstanceView(store, "i1")
    for path in ("cell/c0", "cell/c1"):
        assert (view.cells[path].status, view.cells[path].invocation) == (
            fresh.cells[path].status,
            fresh.cells[path].invocation,
        )
    assert view.cells["cell/c0"].status == "pending" and view.cells["cell/c1"].status == "skipped"


def test_live_updates_are_throttled(store: Store) -> None:
    _instance(store)
    d = InstanceDashboard(store, "i1", live=True, interval=0.5)
    try:
        parent = store.claim("i1", "cell/c0", owner=A, run_id="r1")
        for chunk in range(10):
            paths = [branch_path(parent.step_key, "m", str(chunk * 1000 + i)) for i in range(1000)]
            for c in store.claim_many("i1", paths, owner=A, run_id="r1"):
                store.complete("i1", c.step_key, owner=A, epoch=c.state.epoch, run_id="r1", wait=False)
        store.complete("i1", parent.step_key, owner=A, epoch=parent.state.epoch, run_id="r1")
        deadline = time.monotonic() + 60
        while d.view.cells.get("cell/c0") is None or d.view.cells["cell/c0"].status != "done":
            assert time.monotonic() < deadline, "the dashboard never caught up"
            time.sleep(0.1)
    finally:
        d.stop()
    assert d.view.fanouts["cell/c0@1"].counts()["done"] == 10_000
    # 20,001 events arrived; the renders are bounded by the interval, not by the events.
    assert d.renders < 200
    assert len(RecordingComm.sent) < 2000


def test_store_dashboard_filters_and_opens(store: Store) -> None:
    _instance(store, "i1")
    _instance(store, "i2")
    store.open_instance("other", "j1", {}, manifest_version=0, owner=A, run_id="r")
    _run(store, "i1", "c0", "failed")
    sd = StoreDashboard(store, live=False)
    try:
        assert sd.table.value.count("nbrb-instance-row") == 3
        sd.runbook.value = "deploy"
        assert sorted(sd.choice.options) == ["i1", "i2"]
        sd.status.value = "failed"
        assert list(sd.choice.options) == ["i1"]
        opened = sd.open("i1")
        assert opened is not None and opened.view.status == "failed"
        assert sd.detail.children == (opened.widget,)
    finally:
        sd.stop()
