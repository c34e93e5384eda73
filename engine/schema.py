"""The DuckDB schema as an ordered list of migrations plus a version table.

Migration ``n`` brings a store from version ``n - 1`` to ``n``. A store whose
``schema_version`` is above :data:`CURRENT_VERSION` was written by a newer
nbrunbook and is refused before anything is written.

The ``journal`` is append-only: no code path updates or deletes it
(``tests/test_journal_append_only.py`` checks every statement the package
contains).
"""

from __future__ import annotations

MIGRATIONS: list[list[str]] = [
    # 1: the initial schema (DESIGN.md §4).
    [
        """CREATE TABLE runbooks (
            name VARCHAR PRIMARY KEY,
            created_at DOUBLE NOT NULL
        )""",
        """CREATE TABLE manifests (
            runbook VARCHAR NOT NULL,
            version INTEGER NOT NULL,
            hash VARCHAR NOT NULL,
            cells VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            created_at DOUBLE NOT NULL,
            PRIMARY KEY (runbook, version)
        )""",
        """CREATE TABLE instances (
            instance_id VARCHAR PRIMARY KEY,
            runbook VARCHAR NOT NULL,
            manifest_version INTEGER NOT NULL,
            params VARCHAR NOT NULL,
            options VARCHAR NOT NULL,
            created_at DOUBLE NOT NULL,
            created_by VARCHAR NOT NULL
        )""",
        # One row per (instance, step path); the current invocation is a column.
        """CREATE TABLE cursor (
            instance_id VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            parent VARCHAR,
            invocation INTEGER NOT NULL,
            attempt INTEGER NOT NULL,
            epoch BIGINT NOT NULL,
            status VARCHAR NOT NULL,
            owner VARCHAR,
            run_id VARCHAR,
            token VARCHAR,
            lease_until DOUBLE,
            claimed_at DOUBLE,
            finished_at DOUBLE,
            PRIMARY KEY (instance_id, path)
        )""",
        """CREATE TABLE journal (
            instance_id VARCHAR NOT NULL,
            seq BIGINT NOT NULL,
            step_key VARCHAR,
            event VARCHAR NOT NULL,
            invocation INTEGER,
            attempt INTEGER,
            epoch BIGINT,
            owner VARCHAR,
            run_id VARCHAR,
            ts DOUBLE NOT NULL,
            payload VARCHAR NOT NULL,
            PRIMARY KEY (instance_id, seq)
        )""",
        # Written once per step key, with its ``done``; never updated.
        """CREATE TABLE step_values (
            instance_id VARCHAR NOT NULL,
            step_key VARCHAR NOT NULL,
            name VARCHAR NOT NULL,
            encoding VARCHAR NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (instance_id, step_key, name)
        )""",
    ],
]

CURRENT_VERSION = len(MIGRATIONS)

VERSION_TABLE = """CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE NOT NULL
)"""
