"""The example runbooks of ``notebooks/``, headless: ``nbrunbook run`` in a subprocess, a real kernel.

Every notebook: a clean run, then a second run of the same instance that
skips every step (outputs replayed, values restored). Then, per notebook, a
first run that fails (``simulate_failure``, or the release's missing
approval) and a resume: exit 1 then 0, and every side effect once, checked
in the notebook's own effects files (audit log, load log, channel, package
index) and with the journal/cursor oracles. The dashboard notebook's output
keeps the widget state of its progress bar, full (issue 7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers.oracle import check_effects_once, check_store, read_effects
from helpers.runbooks import Run, cli, digest, read_output
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import idempotency_key
from nbrunbook.engine.model import Event
from nbrunbook.kernel_ext.replay import STATUS_MIME

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

#: The guarded cells of each example, in order, and the values each one restores when skipped.
GUARDED: dict[str, dict[str, set[str]]] = {
    "rotate_credential": {
        "lab": {"service_list", "old_version"},
        "mint": {"new_version", "new_fingerprint"},
        "rollout": {"rollout"},
        "verify": {"stale", "idempotency_key", "attempt", "receipt", "seen"},
        "revoke": {"revoked"},
    },
    "backfill_partitions": {
        "source": {"partitions", "raw_orders"},
        "backfill": {"summaries"},
        "check": {"loaded_orders", "total_revenue"},
    },
    "incident_triage": {
        "evidence": {"evidence"},
        "diagnostics": {"findings"},
        "checklist": {"failing", "suspect", "items", "heading"},
        "post": {"summary", "posted"},
    },
    "release": {
        "build": {"artifact", "sha256"},
        "checks": {"contents", "expected", "problems"},
        "gate": {"approved_by"},
        "publish": {"receipt"},
        "announce": {"announcement"},
    },
}


class Example:
    """One example notebook run headless against a store and a work directory in ``tmp_path``."""

    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.notebook = NOTEBOOKS / f"{name}.ipynb"
        self.store = tmp_path / "store" / "store.duckdb"
        self.work = tmp_path / "work"
        self.dir = tmp_path

    def run(self, instance: str, *params: str, out: str) -> tuple[Run, Any]:
        """``nbrunbook run`` (``-p NAME VALUE`` pairs in ``params``); the result and the output notebook."""
        output = self.dir / out
        pairs = [arg for i in range(0, len(params), 2) for arg in ("-p", params[i], params[i + 1])]
        args = ["run", str(self.notebook), "-i", instance, "--store", str(self.store), "-o", str(output)]
        result = cli(*args, "--no-progress", *pairs)
        return result, read_output(output)

    def events(self, instance: str) -> list[Event]:
        """The instance's journal, after checking every journal/cursor invariant."""
        store = open_store(self.store)
        try:
            return check_store(store, instance)
        finally:
            store.close()

    def approve(self, who: str = "alice") -> None:
        """What the release's approver does."""
        approval = self.work / "approvals" / "release-2.3.0.txt"
        approval.parent.mkdir(parents=True, exist_ok=True)
        approval.write_text(who + "\n")


@pytest.fixture
def untouched() -> Any:
    """The example notebooks are never modified, and nothing is written beside them."""
    before = {p.name: digest(p) for p in NOTEBOOKS.iterdir() if p.is_file()}
    names = {p.name for p in NOTEBOOKS.iterdir()}
    yield
    assert {p.name: digest(p) for p in NOTEBOOKS.iterdir() if p.is_file()} == before
    assert {p.name for p in NOTEBOOKS.iterdir()} - names <= {"__pycache__"}


def _cells(nb: Any) -> dict[str, Any]:
    return {c.id: c for c in nb.cells if c.cell_type == "code"}


def _text(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _runs(nb: Any, ids: Any) -> list[str]:
    cells = _cells(nb)
    return [cells[i].metadata["nbrunbook"]["run"] for i in ids]


def _restored(cell: Any) -> set[str]:
    """The names a skipped cell's status output says it restored (it is the cell's first output)."""
    first = cell.outputs[0]
    assert first.output_type == "display_data" and STATUS_MIME in first.data, first
    status, line = first.data[STATUS_MIME], first.data["text/plain"]
    assert status["status"] == "done" and "already done in run" in line, line
    assert not status["notes"] and not status["not_restored"], line  # the examples' values can all be saved
    assert all(STATUS_MIME not in o.get("data", {}) for o in cell.outputs[1:])  # said once
    return set(status["restored"])


def _claims(events: list[Event], prefix: str) -> dict[str, list[int]]:
    """Attempts claimed per step key under ``prefix``."""
    claims: dict[str, list[int]] = {}
    for e in events:
        if e.event == "claimed" and e.step_key and e.step_key.startswith(prefix):
            claims.setdefault(e.step_key, []).append(e.attempt or 0)
    return claims


def _progress_bars(nb: Any) -> list[dict[str, Any]]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_runs_then_skips_everything_on_resume(name: str, tmp_path: Path, untouched: None) -> None:
    ex = Example(name, tmp_path)
    if name == "release":
        ex.approve()
    guarded = GUARDED[name]
    first, nb = ex.run("first", "workdir", str(ex.work), out="first.ipynb")
    assert first.code == 0, first.stderr
    assert _runs(nb, guarded) == ["ran"] * len(guarded)

    again, nb = ex.run("first", out="again.ipynb")
    assert again.code == 0, again.stderr
    assert _runs(nb, guarded) == ["skipped"] * len(guarded)
    cells = _cells(nb)
    for cell_id, names in guarded.items():
        assert _restored(cells[cell_id]) == names, cell_id
    assert f"ran 0, skipped {len(guarded)} of" in again.stderr
    events = ex.events("first")
    assert {e.step_key for e in events if e.event == "claimed" and e.step_key.count("/") == 1} == {
        f"cell/{cell_id}@1" for cell_id in guarded
    }
    assert not [e for e in events if e.event == "failed"]


def test_rotate_credential_fails_after_the_audit_call_then_resumes(tmp_path: Path, untouched: None) -> None:
    ex = Example("rotate_credential", tmp_path)
    first, nb = ex.run("rotate-1", "workdir", str(ex.work), "simulate_failure", "True", out="first.ipynb")
    assert first.code == 1, first.stderr
    assert "cell 'Verify and audit' (verify): TimeoutError: simulated" in first.stderr
    assert _runs(nb, ["lab", "mint", "rollout", "verify"]) == ["ran", "ran", "ran", "failed"]
    assert _cells(nb)["verify"].outputs[-1].output_type == "error"

    resumed, nb = ex.run("rotate-1", out="resumed.ipynb")
    assert resumed.code == 0, resumed.stderr
    assert _runs(nb, GUARDED["rotate_credential"]) == ["skipped", "skipped", "skipped", "ran", "ran"]
    cells = _cells(nb)
    assert "minted DB_PASSWORD v2" in _text(cells["mint"])  # the recorded output, replayed
    assert "attempt 2: audit audit-1 a repeated request, recorded once" in _text(cells["verify"])

    # The idempotency key: two requests (attempts 1 and 2) with the step's one key, one audit record.
    key = cells["verify"].metadata["nbrunbook"]["idempotency_key"]
    requests = read_effects(ex.work / "audit-requests.jsonl")
    assert requests == [{"idempotency_key": key, "attempt": 1}, {"idempotency_key": key, "attempt": 2}]
    records = read_effects(ex.work / "audit.jsonl")
    assert [(r["idempotency_key"], r["version"]) for r in records] == [(key, "v2")]

    # The secret was minted once (the resume restored new_version) and every service holds it.
    vault = json.loads((ex.work / "vault.json").read_text())["DB_PASSWORD"]
    assert sorted(vault["versions"]) == ["v1", "v2"] and vault["current"] == "v2" and vault["revoked"] == ["v1"]
    for service in ("api", "worker", "reporting"):
        assert f"DB_PASSWORD={vault['versions']['v2']}\n" in (ex.work / "services" / f"{service}.env").read_text()

    events = ex.events("rotate-1")
    claims = _claims(events, "cell/")
    assert claims.pop("cell/verify@1") == [1, 2]
    assert all(v == [1] for v in claims.values()), claims  # minted, rolled out (each branch) once


def test_backfill_resumes_only_the_failed_partition(tmp_path: Path, untouched: None) -> None:
    ex = Example("backfill_partitions", tmp_path)
    first, _ = ex.run("bf-1", "workdir", str(ex.work), "simulate_failure", "True", out="first.ipynb")
    assert first.code == 1, first.stderr
    assert "1 of 6 branches failed: cell/backfill@1/backfill[2024-03-04]@1" in first.stderr
    assert sorted(e["day"] for e in read_effects(ex.work / "loads.jsonl")) == [
        "2024-03-01",
        "2024-03-02",
        "2024-03-03",
        "2024-03-05",
        "2024-03-06",
    ]  # the other branches finished and were recorded

    resumed, nb = ex.run("bf-1", out="resumed.ipynb")
    assert resumed.code == 0, resumed.stderr
    assert _runs(nb, GUARDED["backfill_partitions"]) == ["skipped", "ran", "ran"]
    assert "714 orders" in _text(_cells(nb)["check"])

    loads = read_effects(ex.work / "loads.jsonl")
    assert len(loads) == 6 and len({e["day"] for e in loads}) == 6
    assert [e["attempt"] for e in loads if e["day"] == "2024-03-04"] == [2]
    assert len(list((ex.work / "warehouse").glob("day=*/totals.json"))) == 6

    events = ex.events("bf-1")
    branch_events = [e for e in events if e.step_key and e.step_key.startswith("cell/backfill@1/")]
    check_effects_once(loads, branch_events)  # one load per done branch key
    branches = _claims(events, "cell/backfill@1/")
    assert branches.pop("cell/backfill@1/backfill[2024-03-04]@1") == [1, 2]
    assert len(branches) == 5 and all(v == [1] for v in branches.values()), branches
    assert _claims(events, "cell/backfill@1")["cell/backfill@1"] == [1, 2]
    for e in loads:  # each load is tagged with its own branch's idempotency key
        assert e["step_key"] == f"cell/backfill@1/backfill[{e['day']}]@1"
        assert e["idempotency_key"] == idempotency_key("bf-1", e["step_key"])


def test_incident_triage_resumes_one_check_and_keeps_the_dashboard_full(tmp_path: Path, untouched: None) -> None:
    ex = Example("incident_triage", tmp_path)
    first, _ = ex.run("inc-1", "workdir", str(ex.work), "simulate_failure", "True", out="first.ipynb")
    assert first.code == 1, first.stderr
    assert "cell/diagnostics@1/parallel[recent_deploys]@1" in first.stderr
    assert not (ex.work / "channel.jsonl").exists()

    resumed, nb = ex.run("inc-1", out="resumed.ipynb")
    assert resumed.code == 0, resumed.stderr
    assert _runs(nb, GUARDED["incident_triage"]) == ["skipped", "ran", "ran", "ran"]
    checklist = _cells(nb)["checklist"].outputs
    assert any("3 of 4 checks failing" in o.get("data", {}).get("text/markdown", "") for o in checklist)

    posts = read_effects(ex.work / "channel.jsonl")
    assert [p["idempotency_key"] for p in posts] == [_cells(nb)["post"].metadata["nbrunbook"]["idempotency_key"]]
    events = ex.events("inc-1")
    branches = _claims(events, "cell/diagnostics@1/")
    assert branches.pop("cell/diagnostics@1/parallel[recent_deploys]@1") == [1, 2]
    assert sorted(branches) == [
        "cell/diagnostics@1/parallel[disk]@1",
        "cell/diagnostics@1/parallel[error_rate]@1",
        "cell/diagnostics@1/parallel[latency]@1",
    ] and all(v == [1] for v in branches.values())

    # Issue 7: the dashboard shown in the last cell of a headless run is saved with its bar full.
    dashboard = _cells(nb)["dashboard"]
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in dashboard.outputs)
    bars = _progress_bars(nb)
    assert len(bars) == 1, bars
    assert bars[0]["value"] == bars[0]["max"] == len(GUARDED["incident_triage"]), bars
    assert bars[0]["bar_style"] == "success"


def test_release_waits_for_approval_then_resumes_at_the_gate(tmp_path: Path, untouched: None) -> None:
    ex = Example("release", tmp_path)
    first, nb = ex.run("release-2.3.0", "workdir", str(ex.work), out="first.ipynb")
    assert first.code == 1, first.stderr
    assert "cell 'Approval gate' (gate): PermissionError: release 2.3.0 is not approved yet" in first.stderr
    assert _cells(nb)["gate"].outputs[-1].ename == "PermissionError"
    assert not (ex.work / "index").exists() and not (ex.work / "announcements.jsonl").exists()

    ex.approve("alice")
    resumed, nb = ex.run("release-2.3.0", out="resumed.ipynb")
    assert resumed.code == 0, resumed.stderr
    assert _runs(nb, GUARDED["release"]) == ["skipped", "skipped", "ran", "ran", "ran"]
    cells = _cells(nb)
    assert _restored(cells["build"]) == {"artifact", "sha256"}
    assert "release 2.3.0 approved by alice" in _text(cells["gate"])

    announcements = read_effects(ex.work / "announcements.jsonl")
    assert len(announcements) == 1 and announcements[0]["approved_by"] == "alice"
    receipt = json.loads((ex.work / "index" / "app-2.3.0.json").read_text())
    assert receipt["idempotency_key"] == cells["publish"].metadata["nbrunbook"]["idempotency_key"]
    assert sorted(p.name for p in (ex.work / "index").iterdir()) == ["app-2.3.0.json", "app-2.3.0.tar"]

    events = ex.events("release-2.3.0")
    claims = _claims(events, "cell/")
    assert claims.pop("cell/gate@1") == [1, 2]
    assert all(v == [1] for v in claims.values()), claims  # built and checked once
