"""The security review's claims, checked (RELIABILITY.md, DESIGN.md §4, §11).

* SQL is always parameterised: a static scan of every Python file of the
  package finds each SQL text built at run time (f-strings, ``%``,
  ``.format``, ``+``/``+=`` concatenation) and each ``execute`` whose SQL is
  not a literal, and allows only the reviewed identifier/placeholder
  constructions listed in :data:`REVIEWED`; a canary shows it would catch a
  formatted value. Hostile text through every text field of the store API then
  round-trips exactly and the tables stay intact (both store kinds).
* Store files are private, the WAL too, even when DuckDB re-creates it.
* Stored pickles are never unpickled unless a caller opts in for that value.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import stat
from pathlib import Path

import pytest

from conftest import owner
from nbrunbook.engine import values
from nbrunbook.engine.errors import ValueNotSerializable
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.fanout import recorded_result
from nbrunbook.engine.keys import branch_path
from nbrunbook.engine.launch import stop_server
from nbrunbook.engine.model import EncodedValue, ManifestCell
from nbrunbook.engine.store import Store

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ["nbrunbook", "engine", "kernel_ext", "widgets"]
SQLISH = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|PRAGMA|VALUES|WHERE|FROM|INTO|SET|TABLE|unnest|COPY"
    r"|ATTACH|CHECKPOINT|LIMIT|ORDER BY)\b"
)
EXECUTORS = {"execute", "executemany", "add_sql", "sql", "query"}

#: Every run-time part of an SQL text in the package, reviewed: (file, source of the part) -> why it is safe.
REVIEWED: dict[tuple[str, str], str] = {
    ("engine/embedded.py", "_EVENT_COLS"): "column list, a module constant",
    ("engine/embedded.py", "_CURSOR_COLS"): "column list, a module constant",
    ("engine/embedded.py", "sql"): "a local built from literals and placeholders only (its += are scanned)",
    ("engine/writer.py", "_CURSOR_COLS"): "column list, a module constant",
    ("engine/writer.py", "table"): "table name: every _insert call passes a literal (checked below)",
    ("engine/writer.py", "i"): "the number of a $n placeholder (enumerate over the columns)",
    ("engine/writer.py", "c"): "a column name from _CURSOR_NAMES (a module constant)",
    ("engine/writer.py", '", ".join(f"{c} = ?" for c in columns)'): "SET list: columns checked against _UPDATABLE",
    ("engine/writer.py", '", ".join(f"{c} = v.{c}" for c in _CURSOR_NAMES[2:])'): "SET list from columns",
    (
        "engine/writer.py",
        '", ".join(f"unnest(${i}) AS {c}" for i, c in enumerate(_CURSOR_NAMES, 1))',
    ): "placeholders named by columns",
    ("engine/writer.py", '", ".join([one] * len(rows))'): "a row of placeholders, repeated",
    ("engine/writer.py", '", ".join(marks)'): "placeholders ($n or unnest($n)) from a list comprehension",
}
#: execute() calls whose SQL argument is not a literal: (file, source of the argument) -> what it is.
REVIEWED_CALLS: dict[tuple[str, str], str] = {
    ("engine/dbfile.py", "VERSION_TABLE"): "DDL, a literal in schema.py",
    ("engine/dbfile.py", "statement"): "DDL from schema.MIGRATIONS, literals",
    ("engine/embedded.py", "sql"): "built above from literals and placeholders (scanned)",
    ("engine/writer.py", "sql"): "Batch.sql: statements queued by add_sql (scanned)",
    ("engine/writer.py", "_update_one_sql(tuple(changed))"): "built from _UPDATABLE column names (scanned)",
    ("engine/writer.py", "SQL_UPDATE_CURSOR_MANY"): "module constant (scanned)",
    ("engine/runner.py", "code"): "a Jupyter kernel execute_request, not SQL",
}


def _text(node: ast.AST) -> str:
    """The literal text of a string node (f-string: its constant parts)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return ""


def _concat_parts(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _concat_parts(node.left) + _concat_parts(node.right)
    return [node]


def scan(path: Path, rel: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]], int]:
    """(run-time SQL parts, non-literal execute arguments, SQL texts seen) of one file."""
    src = path.read_text()
    tree = ast.parse(src)
    parts: list[tuple[int, str]] = []
    calls: list[tuple[int, str]] = []
    seen = 0
    covered: set[int] = set()

    def part(node: ast.AST) -> None:
        parts.append((getattr(node, "lineno", 0), ast.get_source_segment(src, node) or ast.dump(node)))

    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and SQLISH.search(_text(node)):
            seen += 1
            for v in node.values:
                if isinstance(v, ast.FormattedValue):
                    part(v.value)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and SQLISH.search(_text(node.left)):
            seen += 1
            part(node.right)  # "... %s" % value
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and id(node) not in covered:
            covered.update(id(n) for n in ast.walk(node) if isinstance(n, ast.BinOp))  # a chain counts once
            pieces = _concat_parts(node)
            if any(SQLISH.search(_text(p)) for p in pieces):
                seen += 1
                for p in pieces:
                    if not (isinstance(p, ast.Constant) and isinstance(p.value, str)) and not isinstance(
                        p, ast.JoinedStr
                    ):
                        part(p)
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add):
            target = ast.get_source_segment(src, node.target) or ""
            if "sql" in target.lower() and not isinstance(node.value, ast.Constant):
                seen += 1
                part(node.value)  # sql += ...: a literal is fine, anything else must be reviewed
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and SQLISH.search(_text(node.func.value))
        ):
            seen += 1
            for a in [*node.args, *(k.value for k in node.keywords)]:
                part(a)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTORS:
            arg = node.args[0] if node.args else None
            if arg is None or isinstance(arg, ast.Constant) or isinstance(arg, (ast.JoinedStr, ast.BinOp)):
                continue  # literals, and built texts (scanned above)
            source = ast.get_source_segment(src, arg) or ""
            built = arg.value if isinstance(arg, ast.Starred) else arg  # execute(*_insert(...))
            if isinstance(built, ast.Call) and getattr(built.func, "id", "") == "_insert":
                if not (built.args and isinstance(built.args[0], ast.Constant)):
                    calls.append((node.lineno, f"_insert with a table name that is not a literal: {source}"))
                continue
            calls.append((node.lineno, source))
    return parts, calls, seen


def _package_files() -> list[tuple[Path, str]]:
    return [(p, str(p.relative_to(ROOT))) for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]


def test_sql_is_always_parameterised() -> None:
    unreviewed: list[str] = []
    used: set[tuple[str, str]] = set()
    seen = 0
    for path, rel in _package_files():
        parts, calls, n = scan(path, rel)
        seen += n
        for line, source in parts:
            if (rel, source) in REVIEWED:
                used.add((rel, source))
            else:
                unreviewed.append(f"{rel}:{line}: run-time SQL part {source!r}")
        for line, source in calls:
            if (rel, source) in REVIEWED_CALLS:
                used.add((rel, source))
            else:
                unreviewed.append(f"{rel}:{line}: execute() of a non-literal {source!r}")
    assert seen >= 10, "the scan found almost no SQL: is it looking at the right files?"
    assert not unreviewed, (
        "SQL built from values that are not reviewed identifiers or placeholders; pass values as parameters "
        "(?, $n), or review the construction and add it to REVIEWED:\n" + "\n".join(unreviewed)
    )
    stale = set(REVIEWED) | set(REVIEWED_CALLS)
    assert used == stale, f"reviewed entries no longer in the code (remove them): {sorted(stale - used)}"


def test_the_sql_scan_would_catch_a_formatted_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def f(con, iid, name):\n"
        "    con.execute(f\"SELECT * FROM journal WHERE instance_id = '{iid}'\")\n"
        "    con.execute(\"DELETE FROM cursor WHERE path = '%s'\" % name)\n"
        '    con.execute("UPDATE instances SET params = \'" + name + "\'")\n'
        "    con.execute(\"INSERT INTO runbooks VALUES ('{}')\".format(name))\n"
        "    sql = 'SELECT 1 FROM instances WHERE runbook = '\n"
        "    sql += name\n"
        "    query = sql\n"
        "    con.execute(query)\n"
    )
    parts, calls, seen = scan(bad, "bad.py")
    assert sorted(source for _, source in parts) == ["iid", "name", "name", "name", "name"]
    assert [source for _, source in calls] == ["\"INSERT INTO runbooks VALUES ('{}')\".format(name)", "query"]
    assert seen == 5


HOSTILE = "x'); DROP TABLE journal; --\"\\\n\t%s{0}$1?:\u2603"
PRINTABLE = HOSTILE.replace("\n", " ").replace("\t", " ")  # runbook names refuse control characters


def test_hostile_text_round_trips_exactly(store: Store) -> None:
    """Every text field of the store API takes SQL metacharacters as plain data."""
    me = owner(HOSTILE.replace("\n", "").replace(":", "."))
    run = "run-" + HOSTILE
    cells = [ManifestCell("c", 0, "guarded", "h1", HOSTILE)]
    m = store.pin_manifest(PRINTABLE, cells, path=HOSTILE)
    params = {"who": HOSTILE, HOSTILE.replace("\n", ""): [HOSTILE]}
    store.open_instance(m.runbook, "inst-1", params, manifest_version=m.version, owner=me, run_id=run)
    claim = store.claim("inst-1", "cell/c", owner=me, run_id=run)
    child = branch_path(claim.step_key, HOSTILE, HOSTILE)
    cc = store.claim("inst-1", child, owner=me, run_id=run)
    store.fail("inst-1", cc.step_key, owner=me, epoch=cc.state.epoch, run_id=run, error={"message": HOSTILE})
    store.resolve("inst-1", child, "skip", owner=me, run_id=run, note=HOSTILE)
    store.append("inst-1", "note", owner=me, run_id=run, payload={HOSTILE: HOSTILE})
    value = values.encode({"v": HOSTILE}, name="v")
    store.complete(
        "inst-1",
        claim.step_key,
        owner=me,
        epoch=claim.state.epoch,
        run_id=run,
        payload={"text": HOSTILE},
        values={HOSTILE: value},
    )
    store.rerun("inst-1", "cell/c", owner=me, run_id=run, reason=HOSTILE)

    assert store.get_instance("inst-1").params == params
    assert store.manifest(m.runbook).cells[0].name == HOSTILE
    assert [s.runbook for s in store.instances(runbook=m.runbook)] == [m.runbook]
    assert store.instances(runbook=PRINTABLE + "' OR '1'='1") == []  # a hostile filter matches nothing
    events = store.journal("inst-1")
    assert [e.event for e in events] == [
        "instance_created",
        "claimed",
        "claimed",
        "failed",
        "resolved",
        "note",
        "done",
        "reopened",
    ]
    assert events[3].payload["error"] == {"message": HOSTILE} and events[3].step_key == cc.step_key
    assert events[4].payload["note"] == HOSTILE and events[5].payload == {HOSTILE: HOSTILE}
    assert events[6].payload["text"] == HOSTILE and events[7].payload["reason"] == HOSTILE
    assert all(e.owner == me and e.run_id == run for e in events)
    assert values.decode(store.values("inst-1", claim.step_key)[HOSTILE]) == {"v": HOSTILE}
    assert {s.path for s in store.steps("inst-1")} == {"cell/c", child}


# ------------------------------------------------------------------ files


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_store_and_its_wal_stay_private_after_a_reopen(tmp_path: Path) -> None:
    """DuckDB re-creates the WAL after a checkpoint with the process umask; the server makes it private."""
    old = os.umask(0o022)  # the usual umask, whatever the test runner's
    try:
        path = tmp_path / "shared" / "store.duckdb"  # a directory other users may enter
        path.parent.mkdir(mode=0o755)
        s = open_store(path)
        s.open_instance("rb", "i1", {}, manifest_version=0, owner=owner("a"), run_id="r")
        s.close()
        stop_server(path)  # checkpoint: the WAL is gone
        assert not Path(f"{path}.wal").exists()
        s = open_store(path)
        try:
            s.open_instance("rb", "i2", {"token": "s3cret"}, manifest_version=0, owner=owner("a"), run_id="r")
            wal = Path(f"{path}.wal")
            assert wal.exists()
            assert _mode(path) == 0o600 and _mode(wal) == 0o600, (oct(_mode(path)), oct(_mode(wal)))
        finally:
            s.close()
    finally:
        os.umask(old)


# ----------------------------------------------------------------- pickle


class _Tripwire:
    """Unpickling this creates a file: the proof that something unpickled stored data."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["embedded", "server"])
def test_stored_pickles_are_not_unpickled_by_default(tmp_path: Path, kind: str) -> None:
    from nbrunbook.kernel_ext.saved import restore

    marker = tmp_path / "unpickled"
    payload = EncodedValue("pickle", pickle.dumps(_Tripwire(str(marker))))
    store = open_store(f"{kind}:{tmp_path / 'store.duckdb'}")
    try:
        store.open_instance("rb", "i", {}, manifest_version=0, owner=owner("a"), run_id="r")
        claim = store.claim("i", "cell/c", owner=owner("a"), run_id="r")
        store.complete(
            "i",
            claim.step_key,
            owner=owner("a"),
            epoch=claim.state.epoch,
            run_id="r",
            values={"result": payload, "x": payload},
        )
        found = store.values("i", claim.step_key)  # the store hands back bytes, decodes nothing
        assert found["x"] == payload and not marker.exists()
        with pytest.raises(ValueNotSerializable, match="decode it only with an explicit opt-in"):
            values.decode(found["x"])
        with pytest.raises(ValueNotSerializable):
            recorded_result(store, store.claim("i", "cell/c", owner=owner("a"), run_id="r"), allow_pickle=False)
        ns: dict[str, object] = {}
        restored, problems = restore(ns, found)  # a skipped cell whose directive does not say :pickle
        assert restored == [] and "x" not in ns and any("pickle" in p for p in problems)
        assert not marker.exists()
        values.decode(found["x"], allow_pickle=True).close()  # the explicit opt-in does unpickle
        assert marker.exists()
    finally:
        store.close()


# --------------------------------------------------------- a tampered store


def test_parameters_read_back_from_a_store_never_become_code(tmp_path: Path) -> None:
    """A resume injects the instance's stored parameters as Python: their names are checked again."""
    import duckdb

    from helpers.runbooks import cli, write_notebook
    from nbrunbook.engine.embedded import EmbeddedStore

    marker = tmp_path / "executed"
    nb = write_notebook(tmp_path / "nb.ipynb", [("p", "x = 1", ["parameters"]), ("s", "print(x)", [])])
    path = tmp_path / "store.duckdb"
    made = EmbeddedStore(str(path))
    made.open_instance("nb", "i1", {"x": 2}, manifest_version=0, owner=owner("a"), run_id="r")
    made.close()
    con = duckdb.connect(str(path))  # someone with write access to the file edits it
    evil = f"import pathlib; pathlib.Path({str(marker)!r}).touch(); y"
    con.execute("UPDATE instances SET params = ? WHERE instance_id = 'i1'", [json.dumps({"x": 2, evil: 1})])
    con.close()
    run = cli("run", str(nb), "-i", "i1", "--store", str(path), "--no-progress")
    assert run.code == 2, run.stderr
    assert "not a valid Python name" in run.stderr and not marker.exists()
