"""status / instances / journal [--follow] / rerun / resolve from the command line (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.runbooks import cli
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.model import ManifestCell

OWNER = "ops@cli-host:5:abc"


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    path = tmp_path / "store.duckdb"
    store = open_store(path)
    try:
        m = store.pin_manifest("deploy", [ManifestCell("a", 0, name="fetch"), ManifestCell("b", 1, name="apply")])
        store.open_instance("deploy", "d-1", {"env": "prod"}, manifest_version=m.version, owner=OWNER, run_id="r1")
        c = store.claim("d-1", "cell/a", owner=OWNER, run_id="r1")
        store.complete("d-1", c.step_key, owner=OWNER, epoch=c.state.epoch, run_id="r1")
        store.claim("d-1", "cell/b", owner=OWNER, run_id="r1")
        store.release_owner(OWNER, reason="killed")
    finally:
        store.close()
    return path


def test_status_and_instances(seeded: Path) -> None:
    out = cli("status", "d-1", "--store", str(seeded))
    assert out.code == 0
    assert "status interrupted" in out.stdout and "1/2 done" in out.stdout and "1 interrupted" in out.stdout
    data = json.loads(cli("status", "d-1", "--store", str(seeded), "--json").stdout)
    assert data["counts"]["done"] == 1 and data["instance"]["params"] == {"env": "prod"}
    listed = json.loads(cli("instances", "--store", str(seeded), "--json").stdout)
    assert [(i["instance_id"], i["status"]) for i in listed] == [("d-1", "interrupted")]
    assert cli("instances", "--store", str(seeded), "--runbook", "other", "--json").stdout.strip() == "[]"
    missing = cli("status", "nope", "--store", str(seeded))
    assert missing.code == 2 and "no instance 'nope'" in missing.stderr


def test_journal_json_fields(seeded: Path) -> None:
    lines = cli("journal", "d-1", "--store", str(seeded), "--json").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    for key in ("seq", "step_key", "event", "invocation", "attempt", "epoch", "owner", "run_id", "ts", "payload"):
        assert all(key in e for e in events), key
    assert events[-1]["event"] == "interrupted" and events[-1]["payload"]["reason"] == "killed"
    assert events[-1]["ts"].endswith("Z")
    since = [
        json.loads(x)["seq"]
        for x in cli("journal", "d-1", "--since", "3", "--json", "--store", str(seeded)).stdout.splitlines()
    ]
    assert since == [4, 5]


def test_resolve_then_rerun(seeded: Path) -> None:
    done = cli("resolve", "d-1", "b", "--done", "--note", "checked", "--store", str(seeded))
    assert done.code == 0 and "now done" in done.stdout
    again = cli("resolve", "d-1", "b", "--skip", "--store", str(seeded))
    assert again.code == 2 and "cannot resolve" in again.stderr
    rerun = cli("rerun", "d-1", "a", "--store", str(seeded))
    assert rerun.code == 0 and "invocation 2" in rerun.stdout
    assert cli("rerun", "d-1", "zzz", "--store", str(seeded)).code == 2
    events = [json.loads(x) for x in cli("journal", "d-1", "--json", "--store", str(seeded)).stdout.splitlines()]
    assert [e["event"] for e in events[-2:]] == ["resolved", "reopened"]
    assert events[-2]["payload"]["note"] == "checked" and events[-1]["step_key"] == "cell/a@2"


def test_journal_follow_streams_new_events(seeded: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbrunbook.engine.cli", "journal", "d-1", "--follow", "--json", "--store", str(seeded)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = [json.loads(proc.stdout.readline())["seq"] for _ in range(5)]
        assert seen == [1, 2, 3, 4, 5]
        store = open_store(seeded)
        try:
            store.append("d-1", "note", owner=OWNER, run_id="r2", payload={"text": "live"})
        finally:
            store.close()
        live = json.loads(proc.stdout.readline())
        assert live["seq"] == 6 and live["payload"] == {"text": "live"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
