"""Where a group commit's cycle goes: the store server's writer, timed, under 8 client processes.

    python bench/trace_groups.py [--processes 8] [--claims 300]

A diagnostic, not a target: it runs a store server in this process (its
writer's ``_execute`` and ``_commit`` wrapped with timers), releases
``--processes`` client processes of ``bench_server.py`` onto distinct steps,
and prints the medians per group, over the groups after the first and
before the last 20:

- ``arrival_spread``: first to last request of the group queued;
- ``op_fns``: the group's operations run in Python (state machine, rows);
- ``commit_sql``: ``BEGIN`` ... ``COMMIT`` in DuckDB;
- ``answering``: from the commit to the last answer handed to its socket;
- ``cycle``: from one group's start to the next one's.

The cycle of N synchronous clients is their spread + the SQL + the answers:
only the SQL is the contract's floor (``bench/contract_floor.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import bench_server  # the client processes are bench_server's

from nbrunbook.engine import writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--claims", type=int, default=300, help="claims per process")
    args = ap.parse_args()

    groups: list[dict[str, float]] = []
    execute, commit = writer.Writer._execute, writer.Writer._commit

    def timed_execute(self: writer.Writer, ops: list[Any]) -> None:
        g = {"first": min(o.submitted for o in ops), "last": max(o.submitted for o in ops), "n": len(ops)}
        g["start"] = time.monotonic()
        groups.append(g)  # timed_commit fills in this group's SQL times
        execute(self, ops)
        g["answered"] = time.monotonic()

    def timed_commit(self: writer.Writer, batch: writer.Batch) -> None:
        g = groups[-1]
        g["sql_start"] = time.monotonic()
        commit(self, batch)
        g["sql_end"] = time.monotonic()

    writer.Writer._execute = timed_execute
    writer.Writer._commit = timed_commit

    with bench_server.server_in_this_process("bench") as path:
        groups.clear()
        rate = bench_server.processes_rate("server", path, args.processes, args.claims)

    g = [x for x in groups if "sql_end" in x and "answered" in x][20:-20]

    def med(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 3)

    print(
        json.dumps(
            {
                "claims_per_s": round(rate),
                "groups": len(g),
                "mean_group": round(statistics.mean(x["n"] for x in g), 2),
                "ms_per_group": {
                    "arrival_spread": med([x["last"] - x["first"] for x in g]),
                    "op_fns": med([x["sql_start"] - x["start"] for x in g]),
                    "commit_sql": med([x["sql_end"] - x["sql_start"] for x in g]),
                    "answering": med([x["answered"] - x["sql_end"] for x in g]),
                    "cycle": med([b["start"] - a["start"] for a, b in itertools.pairwise(g)]),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
