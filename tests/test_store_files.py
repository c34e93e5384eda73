"""Opening store files: wrong files, newer schemas and foreign locks are refused
with a clear error naming the path, and the file is never modified."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import duckdb
import pytest

from helpers.holders import foreign_holder
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.errors import StoreError, StoreLocked, StoreVersionError
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.schema import CURRENT_VERSION


def _fingerprint(path: Path) -> tuple[str, float]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime


@pytest.mark.parametrize(
    "content",
    [b"", b"not a database at all\n", os.urandom(70_000), b"SQLite format 3\x00" + bytes(4000)],
    ids=["empty", "text", "random", "sqlite"],
)
def test_not_a_duckdb_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "store.duckdb"
    path.write_bytes(content)
    before = _fingerprint(path)
    with pytest.raises(StoreError) as info:
        open_store(path)
    assert str(path) in str(info.value) and "not a DuckDB database" in str(info.value)
    assert _fingerprint(path) == before
    assert not (tmp_path / "store.duckdb.wal").exists()


def test_corrupt_duckdb_file(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    EmbeddedStore(str(path)).close()
    data = bytearray(path.read_bytes())
    data[4096:] = os.urandom(len(data) - 4096)  # keep the header, ruin the rest
    path.write_bytes(bytes(data))
    before = _fingerprint(path)
    with pytest.raises(StoreError) as info:
        open_store(path)
    assert str(path) in str(info.value)
    assert _fingerprint(path) == before


def test_other_duckdb_database_is_not_a_store(tmp_path: Path) -> None:
    path = tmp_path / "other.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE sales (x INTEGER)")
    con.close()
    before = _fingerprint(path)
    with pytest.raises(StoreError, match="not an nbrunbook store"):
        open_store(path)
    assert _fingerprint(path) == before


def test_newer_schema_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    EmbeddedStore(str(path)).close()
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version VALUES (?, 0)", [CURRENT_VERSION + 1])
    con.close()
    before = _fingerprint(path)
    with pytest.raises(StoreVersionError) as info:
        open_store(path)
    assert info.value.found == CURRENT_VERSION + 1 and info.value.supported == CURRENT_VERSION
    assert str(path) in str(info.value) and "upgrade nbrunbook" in str(info.value)
    assert _fingerprint(path) == before


def test_foreign_process_holding_the_file(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    s = EmbeddedStore(str(path))
    s.open_instance("rb", "kept", {}, manifest_version=0, owner="a@h:1:x", run_id="r")
    s.close()
    with foreign_holder(path) as holder:
        with pytest.raises(StoreLocked) as info:
            open_store(path)
        assert f"PID {holder.pid}" in str(info.value) and str(path) in str(info.value)
    s = EmbeddedStore(str(path))
    try:
        assert s.get_instance("kept").runbook == "rb"  # nothing lost
    finally:
        s.close()


def test_new_store_is_private(tmp_path: Path) -> None:
    path = tmp_path / ".nbrunbook" / "store.duckdb"
    s = open_store(path)
    s.close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "store.duckdb"
    s = EmbeddedStore(str(path))
    s.open_instance("rb", "i", {"a": [1, 2]}, manifest_version=0, owner="a@h:1:x", run_id="r")
    c = s.claim("i", "cell/x", owner="a@h:1:x", run_id="r")
    s.complete("i", c.step_key, owner="a@h:1:x", epoch=c.state.epoch, run_id="r")
    events = s.journal("i")
    s.close()
    s = EmbeddedStore(str(path))
    try:
        assert s.journal("i") == events
        assert s.get_instance("i").params == {"a": [1, 2]}
        # seq continues where it stopped (the writer reloads it).
        assert s.append("i", "note", owner="a@h:1:x", run_id="r").seq == len(events) + 1
    finally:
        s.close()
