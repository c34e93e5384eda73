"""Opening a DuckDB store file safely: probe, lock errors, migrations, permissions.

Rules: a file that is not a DuckDB database (or is corrupt) is reported and
never overwritten; a store from a newer schema is refused before any write;
a file held by another process is reported with the holder DuckDB names.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

from .errors import StoreError, StoreLocked, StoreVersionError, is_disk_full, store_write_error
from .schema import CURRENT_VERSION, MIGRATIONS, VERSION_TABLE

if TYPE_CHECKING:
    import duckdb

# No network here, and a store must never fetch code: extensions stay off.
DUCKDB_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    # Statement overhead dominates our tiny transactions; one thread avoids
    # scheduling a task pool per statement on a 2-core machine.
    "threads": 1,
}

_LOCK_RE = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
_DUCKDB_MAGIC = b"DUCK"


def _describe_lock(message: str, path: str = "") -> str | None:
    if "Could not set lock" not in message:
        return None
    m = _LOCK_RE.search(message)
    if m:
        pid = int(m.group(2))
        if path and pid == _server_pid(path):
            # The usual case when one store is opened `embedded:` while its server still runs.
            return (
                f"PID {pid}, the store server of this file (open it without `embedded:`, or stop the "
                f"server: nbrunbook server stop --store {path})"
            )
        return f"PID {pid} ({m.group(1)})"
    return "an unknown process"


def _server_pid(path: str) -> int | None:
    """The pid of the store server that owns ``path`` (per its lock file), if one runs."""
    from . import protocol

    try:
        paths = protocol.server_paths(path)
        if not protocol.lock_held(paths):
            return None
        pid = protocol.read_lock_info(paths).get("pid")
    except (OSError, StoreError):
        return None
    return pid if isinstance(pid, int) else None


def _translate(path: str, exc: Exception) -> StoreError:
    message = str(exc)
    holder = _describe_lock(message, path)
    if holder:
        return StoreLocked(path, holder)
    if is_disk_full(exc):
        return store_write_error(path, exc, "cannot open the database")
    if "not a valid DuckDB database" in message:
        return StoreError(path, "not a DuckDB database file (left untouched)")
    return StoreError(path, f"cannot open the database: {message.splitlines()[0]} (left untouched)")


def _check_header(path: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 12 or head[8:12] != _DUCKDB_MAGIC:
        raise StoreError(path, "not a DuckDB database file (left untouched)")


def _read_version(con: duckdb.DuckDBPyConnection) -> int | None:
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "schema_version" not in tables:
        return None if not tables else -1
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def probe(path: str) -> None:
    """Check an existing file read-only: DuckDB, not newer, an nbrunbook store.

    Raises before the file is opened for writing, so a refused file is never
    modified (not even by a WAL replay and checkpoint on close).
    """
    import duckdb

    _check_header(path)
    try:
        con = duckdb.connect(path, read_only=True, config=DUCKDB_CONFIG)
    except duckdb.Error as exc:
        raise _translate(path, exc) from None
    try:
        version = _read_version(con)
    except duckdb.Error as exc:
        raise StoreError(path, f"cannot read the database: {str(exc).splitlines()[0]} (left untouched)") from None
    finally:
        con.close()
    if version == -1:
        raise StoreError(path, "a DuckDB database, but not an nbrunbook store (left untouched)")
    if version is not None and version > CURRENT_VERSION:
        raise StoreVersionError(path, version, CURRENT_VERSION)


def open_database(path: str) -> duckdb.DuckDBPyConnection:
    """Open (creating if absent) and migrate the store file at ``path``."""
    import duckdb

    path = os.path.abspath(path)
    exists = os.path.exists(path)
    if exists:
        if not os.path.isfile(path):
            raise StoreError(path, "not a regular file")
        probe(path)
    else:
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            # The default store directory is private to the user (DESIGN.md §11).
            try:
                os.makedirs(parent, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise store_write_error(path, exc, "cannot create the store's directory") from None
    try:
        con = duckdb.connect(path, config=DUCKDB_CONFIG)
    except duckdb.Error as exc:
        raise _translate(path, exc) from None
    try:
        migrate(con, path)
    except duckdb.Error as exc:
        con.close()
        if is_disk_full(exc):
            raise store_write_error(path, exc, "cannot create the store's tables") from None
        raise
    except BaseException:
        con.close()
        raise
    if not exists:
        # DuckDB creates files with the umask's mode; the store is private.
        for p in (path, path + ".wal"):
            if os.path.exists(p):
                os.chmod(p, 0o600)
    return con


def migrate(con: duckdb.DuckDBPyConnection, path: str) -> int:
    """Apply the missing migrations, each in its own transaction; return the version."""
    version = _read_version(con)
    if version == -1:
        raise StoreError(path, "a DuckDB database, but not an nbrunbook store (left untouched)")
    if version is not None and version > CURRENT_VERSION:
        raise StoreVersionError(path, version, CURRENT_VERSION)
    current = version or 0
    for number in range(current + 1, CURRENT_VERSION + 1):
        con.execute("BEGIN")
        try:
            if number == 1:
                con.execute(VERSION_TABLE)
            for statement in MIGRATIONS[number - 1]:
                con.execute(statement)
            con.execute("INSERT INTO schema_version VALUES (?, ?)", [number, time.time()])
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        current = number
    return current
