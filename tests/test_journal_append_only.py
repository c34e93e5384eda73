"""The journal is append-only: no statement in the package updates or deletes it,
and a workload never changes an event once written."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

from conftest import owner
from nbrunbook.engine.store import Store

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ["nbrunbook", "engine", "kernel_ext", "widgets"]
MUTATING = re.compile(
    r"\b(UPDATE\s+journal|DELETE\s+FROM\s+journal|TRUNCATE\s+journal|DROP\s+TABLE\s+(IF\s+EXISTS\s+)?journal"
    r"|ALTER\s+TABLE\s+journal|INSERT\s+OR\s+REPLACE\s+INTO\s+journal|INSERT\s+INTO\s+journal\b[^;]*ON\s+CONFLICT)\b",
    re.IGNORECASE,
)


def _strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    inside_fstrings = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside_fstrings:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            found.append((node.lineno, text))
    return found


def test_no_statement_in_the_package_mutates_the_journal() -> None:
    files = [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 5
    sql_seen = 0
    offenders = []
    for f in files:
        for line, text in _strings(f):
            if re.search(r"\bjournal\b", text, re.IGNORECASE) and re.search(r"\b(INSERT|SELECT)\b", text):
                sql_seen += 1
            if MUTATING.search(" ".join(text.split())):
                offenders.append(f"{f.relative_to(ROOT)}:{line}: {text[:80]!r}")
    assert sql_seen >= 3, "the scan found no journal SQL at all: is it looking at the right files?"
    assert not offenders, offenders


def test_the_scan_would_catch_a_mutation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        'SQL = """UPDATE  journal\\n SET payload = ? WHERE seq = ?"""\nX = f"DELETE FROM journal WHERE {1}"\n'
    )
    hits = [t for _, t in _strings(bad) if MUTATING.search(" ".join(t.split()))]
    assert len(hits) == 2


def test_events_never_change_once_written(store: Store, new_instance: Callable[..., str]) -> None:
    iid = new_instance()
    a, b = owner("a"), owner("b")
    snapshots = []
    c = store.claim(iid, "cell/x", owner=a, run_id="r", lease=0.05)
    snapshots.append(store.journal(iid))
    store.release_owner(a, reason="gone")
    store.resolve(iid, "cell/x", "rerun", owner=b, run_id="r")
    snapshots.append(store.journal(iid))
    c = store.claim(iid, "cell/x", owner=b, run_id="r")
    store.complete(iid, c.step_key, owner=b, epoch=c.state.epoch, run_id="r")
    store.rerun(iid, "cell/x", owner=b, run_id="r")
    snapshots.append(store.journal(iid))
    final = store.journal(iid)
    for snap in snapshots:
        assert final[: len(snap)] == snap
