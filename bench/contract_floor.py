"""The contract's floor: the SQL the claim protocol cannot do without, run bare on DuckDB.

DESIGN.md §2 rule 2 puts a claim's cursor row and its ``claimed`` event in one
transaction that commits before the cell runs; §3 records an outcome the same
way (cursor row + ``done`` event, plus the saved values). So, whatever the
engine around it, each of these costs at least:

* ``pipelined_step``: one step's claim sharing a commit with the previous
  step's outcome - ``BEGIN``; ``INSERT`` cursor row; ``UPDATE`` the previous
  row; ``INSERT`` 2 journal rows; ``COMMIT`` (bench_store's sequential case);
* ``cell_step``: the same plus ``INSERT`` 2 ``step_values`` rows (a cell's
  value and its output record: bench_kernel's case);
* ``group_of_8``: 8 claims in one group commit - ``BEGIN``; ``INSERT`` 8
  cursor rows; ``INSERT`` 8 journal rows; ``COMMIT`` (bench_store's 8
  threads: a synchronous claimer has one claim in flight, so 8 threads
  give groups of at most 8).

Each is measured on a fresh file with the store's own schema, as one-row
``VALUES`` / ``unnest`` statements exactly like the writer sends them, with
no Python machinery around it. A target below its floor cannot be met on
this machine by any engine that keeps the contract.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from nbrunbook.engine.dbfile import open_database

OWNER = "bench@bench-host:1:abc"
_CURSOR = "INSERT INTO cursor VALUES (?, ?, NULL, 1, 1, 1, 'running', ?, 'r', 't', ?, ?, NULL)"
_UPDATE = "UPDATE cursor SET status = 'done', finished_at = ?, lease_until = NULL, token = NULL "
_UPDATE += "WHERE instance_id = ? AND path = ?"
_JOURNAL_ROW = "(?, ?, ?, ?, 1, 1, 1, ?, 'r', ?, '{}')"
_VALUES_2 = "INSERT INTO step_values VALUES (?, ?, 'v', 'json', ?), (?, ?, '#cell', 'json', ?)"
_UNNEST_CURSOR = (
    "INSERT INTO cursor SELECT unnest($1), unnest($2), NULL, 1, 1, 1, 'running', unnest($3), 'r', 't', "
    "unnest($4), unnest($5), NULL"
)
_UNNEST_JOURNAL = (
    "INSERT INTO journal SELECT unnest($1), unnest($2), unnest($3), 'claimed', 1, 1, 1, unnest($4), 'r', "
    "unnest($5), '{}'"
)


def measure(directory: Path, steps: int = 300) -> dict[str, float]:
    """Median ms of each floor transaction (see module doc), alternating them step by step."""
    con = open_database(str(directory / "floor.duckdb"))
    try:
        return _measure(con, steps)
    finally:
        con.close()


def _measure(con: Any, steps: int) -> dict[str, float]:
    seq = {"pipe": 0, "cell": 0, "group": 0}
    times: dict[str, list[float]] = {"pipelined_step": [], "cell_step": [], "group_of_8": []}

    def step(iid: str, i: int, with_values: bool) -> None:
        now = time.time()
        con.execute("BEGIN TRANSACTION")
        con.execute(_CURSOR, [iid, f"cell/s{i}", OWNER, now + 30, now])
        con.execute(_UPDATE, [now, iid, f"cell/s{i - 1}"])
        s = seq["cell" if with_values else "pipe"]
        con.execute(
            f"INSERT INTO journal VALUES {_JOURNAL_ROW}, {_JOURNAL_ROW}",
            [iid, s + 1, f"cell/s{i - 1}@1", "done", OWNER, now, iid, s + 2, f"cell/s{i}@1", "claimed", OWNER, now],
        )
        seq["cell" if with_values else "pipe"] = s + 2
        if with_values:
            key = f"cell/s{i - 1}@1"
            con.execute(_VALUES_2, [iid, key, b"3", iid, key, b'{"outputs":[]}'])
        con.execute("COMMIT")

    def group(i: int) -> None:
        now = time.time()
        paths = [f"cell/g{i}-{k}" for k in range(8)]
        first = seq["group"] + 1
        seq["group"] += 8
        con.execute("BEGIN TRANSACTION")
        con.execute(_UNNEST_CURSOR, [["g"] * 8, paths, [OWNER] * 8, [now + 30] * 8, [now] * 8])
        keys = [p + "@1" for p in paths]
        con.execute(_UNNEST_JOURNAL, [["g"] * 8, list(range(first, first + 8)), keys, [OWNER] * 8, [now] * 8])
        con.execute("COMMIT")

    for iid in ("p", "c"):  # the first step's "previous" row
        now = time.time()
        con.execute(_CURSOR, [iid, "cell/s0", OWNER, now + 30, now])
    for i in range(1, steps + 1):
        for name in ("pipelined_step", "cell_step", "group_of_8"):
            t = time.perf_counter()
            if name == "group_of_8":
                group(i)
            else:
                step("p" if name == "pipelined_step" else "c", i, name == "cell_step")
            times[name].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}


if __name__ == "__main__":  # python bench/contract_floor.py: the floors alone
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nbrb-floor-") as tmp:
        print(json.dumps(measure(Path(tmp)), indent=2))
