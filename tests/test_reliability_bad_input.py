"""The bad-input corpus: every file under ``tests/corpus/`` is fed to ``nbrunbook run``.

Each bad input gets one clear error naming the problem, exit 2 (bad input) or
4 (store unavailable), and leaves everything as it was: the notebook's bytes
and mtime, the store file absent (no directory created) or byte-identical
with no journal rows added, no output notebook. A few inputs are odd but
valid and must run: an nbformat 4.4 notebook without ids (derived ids and a
notice), a cell printing 11 MiB (recorded up to the cap, with a note), a
``save=`` of an open file (a clear warning naming it, repeated whenever the
cell is skipped; the cell's effect is not repeated), hostile-looking names
that are only data.

:data:`CORPUS` is the registry: one entry per corpus file (a test checks the
folder and the registry match), parametrised like jupytext's tests over a
folder of notebooks. Stores that cannot be kept as files (a newer schema, a
foreign lock, another DuckDB database) are built by :func:`_build_store`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from helpers.holders import foreign_holder
from helpers.runbooks import Run, cli, read_output, write_notebook
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.schema import CURRENT_VERSION
from nbrunbook.kernel_ext.defaults import OUTPUT_LIMIT
from nbrunbook.kernel_ext.replay import STATUS_MIME

CORPUS_DIR = Path(__file__).parent / "corpus"


@dataclass(frozen=True)
class Expect:
    """What ``nbrunbook run`` must do with a corpus file used ``as_`` notebook, store, params or ids."""

    as_: str
    code: int
    message: str = ""


#: One entry per file of tests/corpus/.
CORPUS: dict[str, Expect] = {
    # notebooks that must be refused: the first five before a kernel starts; the last by
    # nbformat's schema while the run's kernel boots, which then goes too (see test_runner's
    # test_a_notebook_refused_by_its_schema_leaves_no_kernel_behind)
    "malformed-json.ipynb": Expect("notebook", 2, "is not valid JSON (line "),
    "not-a-notebook.ipynb": Expect("notebook", 2, "is not a Jupyter notebook (no cell list)"),
    "not-utf8.ipynb": Expect("notebook", 2, "cannot be read ('utf-8' codec can't decode"),
    "nbformat3.ipynb": Expect("notebook", 2, "nbformat 3 is not supported; open and save it with Jupyter"),
    "duplicate-ids.ipynb": Expect("notebook", 2, "duplicate cell ids in the notebook: deploy"),
    "bad-cell-id.ipynb": Expect("notebook", 2, "is not a valid notebook ("),
    # notebooks that are odd but must run
    "nbformat44-no-ids.ipynb": Expect("notebook", 0, "has no cell ids (nbformat 4.4): using ids derived"),
    "huge-output.ipynb": Expect("notebook", 0),
    "unserialisable-save.ipynb": Expect("notebook", 0),
    # files given as the store
    "garbage-store.bin": Expect("store", 4, "not a DuckDB database file (left untouched)"),
    "sqlite-store.bin": Expect("store", 4, "not a DuckDB database file (left untouched)"),
    # parameter files (-f)
    "params-date.yaml": Expect("params", 2, "parameter release_day: values of type date are not plain data"),
    "params-nan.yaml": Expect("params", 2, "parameter ratio: nan cannot be a fixed parameter value"),
    "params-inf.yaml": Expect("params", 2, "parameter budget: -inf cannot be a fixed parameter value"),
    "params-binary.yaml": Expect("params", 2, "parameter blob: values of type bytes are not plain data"),
    "params-set.yaml": Expect("params", 2, "parameter hosts: values of type set are not plain data"),
    "params-list.yaml": Expect("params", 2, "expected a mapping of names to values, got list"),
    "params-bad-name.yaml": Expect("params", 2, "parameter class: not a valid Python name"),
    "params-broken.yaml": Expect("params", 2, "not valid YAML"),
    # one bad instance id per line
    "instance-ids.txt": Expect("instance-ids", 2, "invalid instance id"),
}


def _bad_ids() -> list[str]:
    lines = (CORPUS_DIR / "instance-ids.txt").read_text().split("\n")
    return ["", *[ln for ln in lines if ln and not ln.startswith("# ")]]  # the empty id too


def _fingerprint(path: Path) -> tuple[str, int] | None:
    if not path.exists():
        return None
    if path.is_dir():
        return "directory", path.stat().st_mtime_ns
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def _journal_rows(store: Path) -> int:
    con = duckdb.connect(str(store), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM journal").fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


class Scene:
    """A notebook and a store in a fresh directory, and their state before the run."""

    def __init__(self, tmp: Path, notebook: Path | None = None, store_file: Path | None = None) -> None:
        self.dir = tmp
        self.nb = notebook or write_notebook(tmp / "good.ipynb", [("step", "print('ran')", [])])
        self.store = tmp / "store" / "store.duckdb"
        if store_file is not None:
            self.store.parent.mkdir()
            shutil.copyfile(store_file, self.store)
        self.before = (_fingerprint(self.nb), _fingerprint(self.store), sorted(p.name for p in tmp.iterdir()))

    def run(self, *args: str, instance: str | None = "corpus-1") -> Run:
        ids = ["-i", instance] if instance is not None else []
        return cli("run", str(self.nb), *ids, "--store", str(self.store), "--no-progress", *args, cwd=self.dir)

    def assert_refused(self, run: Run, code: int, message: str) -> None:
        """One clear error line, the exit code, and nothing touched."""
        assert run.code == code, run.stderr
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("nbrunbook: error: "), run.stderr
        assert message in lines[0], run.stderr
        nb, store, listing = self.before
        assert _fingerprint(self.nb) == nb, "the notebook was modified"
        assert _fingerprint(self.store) == store, "the store was created or modified"
        assert not Path(f"{self.store}.wal").exists()
        assert sorted(p.name for p in self.dir.iterdir()) == listing, "files were created"
        if store is None:
            assert not self.store.parent.exists()  # no store directory, no output notebook
        else:
            assert sorted(p.name for p in self.store.parent.iterdir()) == [self.store.name]


# ------------------------------------------------------------------ the folder


def test_the_corpus_folder_and_its_registry_match() -> None:
    # README.md documents the compatibility corpus in the sub-folders (tests/test_compat_corpus.py).
    files = {p.name for p in CORPUS_DIR.iterdir() if p.is_file() and p.name != "README.md"}
    assert files == set(CORPUS), f"unregistered: {files - set(CORPUS)}; missing: {set(CORPUS) - files}"


def _refused(kind: str) -> list[str]:
    return [name for name, e in CORPUS.items() if e.as_ == kind and e.code != 0]


@pytest.mark.parametrize("name", _refused("notebook"))
def test_bad_notebook_is_refused(tmp_path: Path, name: str) -> None:
    nb = tmp_path / name
    shutil.copyfile(CORPUS_DIR / name, nb)
    scene = Scene(tmp_path, notebook=nb)
    scene.assert_refused(scene.run(), CORPUS[name].code, CORPUS[name].message)


@pytest.mark.parametrize("name", _refused("store"))
def test_bad_store_file_is_refused(tmp_path: Path, name: str) -> None:
    scene = Scene(tmp_path, store_file=CORPUS_DIR / name)
    run = scene.run()
    scene.assert_refused(run, CORPUS[name].code, CORPUS[name].message)
    assert f"store {scene.store}: " in run.stderr  # the message names the file


@pytest.mark.parametrize("name", _refused("params"))
def test_bad_parameters_file_is_refused(tmp_path: Path, name: str) -> None:
    params = tmp_path / name
    shutil.copyfile(CORPUS_DIR / name, params)
    scene = Scene(tmp_path)
    scene.assert_refused(scene.run("-f", str(params)), CORPUS[name].code, CORPUS[name].message)


@pytest.mark.parametrize("bad", _bad_ids(), ids=lambda s: repr(s)[:40])
def test_bad_instance_id_is_refused(tmp_path: Path, bad: str) -> None:
    scene = Scene(tmp_path)
    run = scene.run(instance=bad)
    scene.assert_refused(run, 2, f"invalid instance id {bad!r}: use 1-128 characters of A-Z a-z 0-9 . _ : -")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-y", "release_day: 2024-01-31"], "parameter release_day: values of type date are not plain data"),
        (["-p", "ratio", "nan"], "parameter ratio: nan cannot be a fixed parameter value"),
        (["-p", "budget", "inf"], "parameter budget: inf cannot be a fixed parameter value"),
        (["-y", "{1: one}"], "parameter 1: not a valid Python name"),
        (["-y", "nested: {when: 2024-01-31}"], "parameter nested: values of type dict are not plain data"),
        (["-f", "missing.yaml"], "cannot read the parameters file"),
    ],
    ids=["yaml-date", "p-nan", "p-inf", "int-key", "nested-date", "missing-file"],
)
def test_bad_parameters_on_the_command_line(tmp_path: Path, args: list[str], message: str) -> None:
    scene = Scene(tmp_path)
    scene.assert_refused(scene.run(*args), 2, message)


# ------------------------------------------------------ stores built for the test


def _build_store(kind: str, path: Path) -> Iterator[str]:
    """Make a bad store at ``path``; yields the message the run must give (a generator: cleanup after)."""
    path.parent.mkdir()
    if kind == "directory":
        path.mkdir()
        yield "not a regular file"
        return
    if kind == "other-duckdb":
        con = duckdb.connect(str(path))
        con.execute("CREATE TABLE sales (amount INTEGER)")
        con.close()
        yield "a DuckDB database, but not an nbrunbook store (left untouched)"
        return
    EmbeddedStore(str(path)).close()
    if kind == "newer-schema":
        con = duckdb.connect(str(path))
        con.execute("INSERT INTO schema_version VALUES (?, 0)", [CURRENT_VERSION + 1])
        con.close()
        yield f"schema version {CURRENT_VERSION + 1}"
        return
    assert kind == "locked"
    with foreign_holder(path) as holder:
        yield f"PID {holder.pid}"


@pytest.mark.parametrize("kind", ["newer-schema", "locked", "other-duckdb", "directory"])
def test_bad_store_built_at_test_time_is_refused(tmp_path: Path, kind: str) -> None:
    store = tmp_path / "store" / "store.duckdb"
    build = _build_store(kind, store)
    message = next(build)
    try:
        scene = Scene(tmp_path)  # its store path is the one just built
        run = scene.run()
        assert run.code == 4, run.stderr
        lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("nbrunbook: error: store "), run.stderr
        assert message in lines[0] and str(store) in lines[0], run.stderr
        assert _fingerprint(scene.nb) == scene.before[0]
        assert _fingerprint(store) == scene.before[1], "the store was modified"
        assert sorted(p.name for p in store.parent.iterdir()) == [store.name]  # no WAL, no output notebook
    finally:
        for _ in build:
            pass
    if kind in ("newer-schema", "locked"):
        assert _journal_rows(store) == 0  # the run added nothing, even once the lock is gone


def test_bad_store_found_by_the_kernel_without_an_instance_id(tmp_path: Path) -> None:
    """Without ``-i`` the store is first opened in the kernel: same exit code and message."""
    scene = Scene(tmp_path, store_file=CORPUS_DIR / "garbage-store.bin")
    run = scene.run(instance=None)
    assert run.code == 4, run.stderr
    assert "StoreError: store " in run.stderr and "not a DuckDB database file (left untouched)" in run.stderr
    assert _fingerprint(scene.store) == scene.before[1] and _fingerprint(scene.nb) == scene.before[0]


# ------------------------------------------------------------ odd but must run


def _copy(tmp_path: Path, name: str) -> Scene:
    nb = tmp_path / name
    shutil.copyfile(CORPUS_DIR / name, nb)
    return Scene(tmp_path, notebook=nb)


def test_nbformat_44_runs_with_derived_ids_and_a_notice(tmp_path: Path) -> None:
    scene = _copy(tmp_path, "nbformat44-no-ids.ipynb")
    first = scene.run()
    assert first.code == 0, first.stderr
    assert CORPUS["nbformat44-no-ids.ipynb"].message in first.stderr
    assert "`nbrunbook upgrade" in first.stderr  # and how to write the ids into the file
    assert _fingerprint(scene.nb) == scene.before[0]  # derived in memory only
    s = open_store(scene.store)
    try:
        steps = s.steps("corpus-1")
    finally:
        s.close()
    # One guarded cell (the others are an import and a constant): the third code cell, c2-<source hash>.
    assert [st.status for st in steps] == ["done"] and steps[0].path.startswith("cell/c2-")
    again = scene.run()  # the same ids again: skipped, not re-run
    assert again.code == 0 and "ran 0, skipped 1" in again.stderr, again.stderr


def test_huge_output_is_capped_and_the_store_not_bloated(tmp_path: Path) -> None:
    scene = _copy(tmp_path, "huge-output.ipynb")
    run = scene.run()
    assert run.code == 0, run.stderr
    s = open_store(scene.store)
    try:
        step = next(st for st in s.steps("corpus-1") if st.path == "cell/flood")
        record = s.values("corpus-1", step.step_key)["#cell"].data
        after = next(st for st in s.steps("corpus-1") if st.path == "cell/after")
        assert after.status == "done"
    finally:
        s.close()
    assert OUTPUT_LIMIT < 11 << 20
    assert len(record) <= OUTPUT_LIMIT + 4096, len(record)  # the cap, not the 11 MiB printed
    kept = json.loads(record)
    assert kept["limit"] == OUTPUT_LIMIT and kept["dropped"] > 10 << 20  # what was cut off, counted
    assert kept["messages"] and len(kept["messages"][0]["c"]["text"]) > OUTPUT_LIMIT // 2  # the start is kept
    again = scene.run()
    assert again.code == 0, again.stderr
    cells = {c.id: c for c in read_output(scene.store.parent / "out" / "huge-output" / "corpus-1.ipynb").cells}
    (status,) = [o for o in cells["flood"].outputs if STATUS_MIME in o.get("data", {})]
    assert "bytes of its output were not recorded (limit 1048576 bytes per cell)" in status.data["text/plain"]
    launch_stop(scene.store)  # checkpoint, so the file size is what stays
    size = sum(p.stat().st_size for p in scene.store.parent.glob("store.duckdb*"))
    assert size < 4 * OUTPUT_LIMIT, f"the store grew to {size} bytes for 11 MiB of output"
    assert _fingerprint(scene.nb) == scene.before[0]


def test_unserialisable_saved_value_is_named_and_not_rerun(tmp_path: Path) -> None:
    scene = _copy(tmp_path, "unserialisable-save.ipynb")
    run = scene.run()
    assert run.code == 0, run.stderr  # the cell's effect happened: failing it would re-run it
    out = read_output(scene.store.parent / "out" / "unserialisable-save" / "corpus-1.ipynb")
    stderr = "".join(o.get("text", "") for o in out.cells[1].outputs if o.get("name") == "stderr")
    assert "cannot record 'f': values of type _io.TextIOWrapper are not JSON- or Arrow-serialisable" in stderr
    s = open_store(scene.store)
    try:
        values = s.values("corpus-1", "cell/open-file@1")
    finally:
        s.close()
    assert "f" not in values and "#cell" in values
    again = scene.run()
    assert again.code == 0 and "ran 0, skipped 2" in again.stderr, again.stderr
    out = read_output(scene.store.parent / "out" / "unserialisable-save" / "corpus-1.ipynb")
    (status,) = [o for o in out.cells[1].outputs if STATUS_MIME in o.get("data", {})]
    line = status.data["text/plain"]
    assert "not restored: f (save=f: a TextIOWrapper cannot be recorded)" in line, line  # said in the status
    assert status.data[STATUS_MIME]["not_restored"] == {"f": "save=f: a TextIOWrapper cannot be recorded"}
    assert _fingerprint(scene.nb) == scene.before[0]


def test_hostile_names_are_only_data(tmp_path: Path) -> None:
    """SQL and shell characters in the runbook name and parameters, a dotted instance id: all just data."""
    name = "x'; DROP TABLE journal;--"
    nb = write_notebook(tmp_path / f"{name}.ipynb", [("p", "who = 'nobody'", ["parameters"]), ("s", "print(who)", [])])
    scene = Scene(tmp_path, notebook=nb)
    value = "inst'); DELETE FROM cursor WHERE ('1'='1"
    run = scene.run("-p", "who", value, instance="..")
    assert run.code == 0, run.stderr
    s = open_store(scene.store)
    try:
        inst = s.get_instance("..")
        events = s.journal("..")
    finally:
        s.close()
    assert inst.runbook == name and inst.params == {"who": value}
    assert [e.event for e in events if e.step_key] == ["claimed", "done"]
    output = scene.store.parent / "out" / name / "...ipynb"
    assert output.is_file() and value in output.read_text()  # inside the out directory, nowhere else
    assert _fingerprint(scene.nb) == scene.before[0]


def launch_stop(store: Path) -> None:
    from nbrunbook.engine.launch import stop_server

    stop_server(store)
