"""Embedded store benchmarks (DESIGN.md §10), each against a baseline in the same run.

    python bench/bench_store.py [--steps N] [--repeat R]

1. claim+complete of one step, sequential:
   - baseline: naive SQL, two transactions per step (read the cursor row,
     check, insert/update it, read max(seq)+1, insert the event);
   - nbrunbook, complete waited for (``wait=True``: two commits per step);
   - nbrunbook, complete pipelined (``wait=False``: the outcome shares the
     next claim's commit - one durable commit per step, still ordered).
2. claims/s with 8 threads on distinct steps:
   - baseline: one transaction per claim (lean SQL, per-thread cursors);
   - nbrunbook: the writer's group commit.

3. The contract's floor (bench/contract_floor.py) in the same run: the bare SQL a
   pipelined step and a group of 8 claims need, with nothing around it. A
   target below its floor cannot be met here by any engine keeping DESIGN.md
   §2 rule 2 (cursor row and event committed together before the cell runs).

Prints one JSON object; BENCHMARKS.md records it with the command line.
Medians over ``--repeat`` rounds, all in one process, alternating order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
from contract_floor import measure as contract_floor

from nbrunbook.engine.dbfile import DUCKDB_CONFIG, open_database
from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.keys import process_owner
from nbrunbook.engine.model import ClaimOutcome


def naive_pairs(path: Path, n: int) -> float:
    """Seconds per claim+complete with read-check-write SQL, one txn each."""
    con = open_database(str(path))
    iid = "naive"
    me = process_owner()

    def txn(step: str, status: str, event: str) -> None:
        con.execute("BEGIN TRANSACTION")
        row = con.execute("SELECT status, epoch FROM cursor WHERE instance_id = ? AND path = ?", [iid, step]).fetchone()
        epoch = (row[1] if row else 0) + (1 if event == "claimed" else 0)
        if row is None:
            con.execute(
                "INSERT INTO cursor VALUES (?, ?, NULL, 1, 1, ?, ?, ?, 'r', NULL, ?, ?, NULL)",
                [iid, step, epoch, status, me, time.time() + 30, time.time()],
            )
        else:
            con.execute(
                "UPDATE cursor SET status = ?, finished_at = ? WHERE instance_id = ? AND path = ? AND epoch = ?",
                [status, time.time(), iid, step, epoch],
            )
        seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM journal WHERE instance_id = ?", [iid]).fetchone()[0]
        con.execute(
            "INSERT INTO journal VALUES (?, ?, ?, ?, 1, 1, ?, ?, 'r', ?, '{}')",
            [iid, seq, step + "@1", event, epoch, me, time.time()],
        )
        con.execute("COMMIT")

    t = time.perf_counter()
    for i in range(n):
        txn(f"cell/s{i}", "running", "claimed")
        txn(f"cell/s{i}", "done", "done")
    elapsed = time.perf_counter() - t
    con.close()
    return elapsed / n


def store_pairs(path: Path, n: int, wait: bool) -> tuple[float, float]:
    """Seconds per claim+complete through the store; also commits per step."""
    store = EmbeddedStore(str(path))
    me = process_owner()
    store.open_instance("bench", "i", {}, manifest_version=0, owner=me, run_id="r")
    groups0 = store.writer.groups
    t = time.perf_counter()
    for i in range(n):
        c = store.claim("i", f"cell/s{i}", owner=me, run_id="r")
        assert c.outcome is ClaimOutcome.CLAIMED
        store.complete("i", c.step_key, owner=me, epoch=c.state.epoch, run_id="r", wait=wait)
    store.flush()
    elapsed = time.perf_counter() - t
    commits = (store.writer.groups - groups0) / n
    store.close()
    return elapsed / n, commits


def naive_threads(path: Path, threads: int, per_thread: int) -> float:
    """Claims/s with one transaction per claim from ``threads`` threads."""
    con = open_database(str(path))
    seq_lock = threading.Lock()
    seq = [0]
    me = process_owner()

    def worker(w: int) -> None:
        cur = con.cursor()
        for i in range(per_thread):
            with seq_lock:
                seq[0] += 1
                s = seq[0]
            cur.execute("BEGIN TRANSACTION")
            cur.execute(
                "INSERT INTO cursor VALUES (?, ?, NULL, 1, 1, 1, 'running', ?, 'r', NULL, ?, ?, NULL)",
                ["t", f"cell/w{w}-{i}", me, time.time() + 30, time.time()],
            )
            cur.execute(
                "INSERT INTO journal VALUES (?, ?, ?, 'claimed', 1, 1, 1, ?, 'r', ?, '{}')",
                ["t", s, f"cell/w{w}-{i}@1", me, time.time()],
            )
            cur.execute("COMMIT")
        cur.close()

    elapsed = _run_threads(worker, threads)
    con.close()
    return threads * per_thread / elapsed


def store_threads(path: Path, threads: int, per_thread: int) -> tuple[float, float]:
    """Claims/s through the store's group commit; also claims per commit."""
    store = EmbeddedStore(str(path))
    me = process_owner()
    store.open_instance("bench", "t", {}, manifest_version=0, owner=me, run_id="r")
    groups0 = store.writer.groups

    def worker(w: int) -> None:
        for i in range(per_thread):
            c = store.claim("t", f"cell/w{w}-{i}", owner=me, run_id="r")
            assert c.outcome is ClaimOutcome.CLAIMED

    elapsed = _run_threads(worker, threads)
    per_commit = threads * per_thread / max(1, store.writer.groups - groups0)
    store.close()
    return threads * per_thread / elapsed, per_commit


def _run_threads(worker: Callable[[int], None], threads: int) -> float:
    barrier = threading.Barrier(threads + 1)

    def wrapped(w: int) -> None:
        barrier.wait()
        worker(w)

    pool = [threading.Thread(target=wrapped, args=(w,)) for w in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400, help="steps per sequential round")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--per-thread", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _ = duckdb.__version__, DUCKDB_CONFIG  # (both measured on the same DuckDB build)

    naive, sync, pipelined, sync_commits, pipe_commits = [], [], [], [], []
    naive_tp, store_tp, per_commit = [], [], []
    floors: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="nbrb-bench-") as tmp:
        d = Path(tmp)
        for r in range(args.repeat):
            floor_dir = d / f"floor-{r}"
            floor_dir.mkdir()
            floors.append(contract_floor(floor_dir, steps=200))
            order = ["naive", "sync", "pipe"] if r % 2 == 0 else ["pipe", "sync", "naive"]
            for what in order:
                path = d / f"{what}-{r}.duckdb"
                if what == "naive":
                    naive.append(naive_pairs(path, args.steps))
                elif what == "sync":
                    s, c = store_pairs(path, args.steps, wait=True)
                    sync.append(s)
                    sync_commits.append(c)
                else:
                    s, c = store_pairs(path, args.steps, wait=False)
                    pipelined.append(s)
                    pipe_commits.append(c)
            for what in ["naive", "store"] if r % 2 == 0 else ["store", "naive"]:
                path = d / f"t-{what}-{r}.duckdb"
                if what == "naive":
                    naive_tp.append(naive_threads(path, args.threads, args.per_thread))
                else:
                    tp, pc = store_threads(path, args.threads, args.per_thread)
                    store_tp.append(tp)
                    per_commit.append(pc)

    med = statistics.median
    result = {
        "machine": (
            f"{platform.machine()} {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, duckdb {duckdb.__version__}"
        ),
        "claim_complete_ms": {
            "naive_2txn": round(med(naive) * 1e3, 3),
            "nbrunbook_wait": round(med(sync) * 1e3, 3),
            "nbrunbook_pipelined": round(med(pipelined) * 1e3, 3),
            "commits_per_step_wait": round(med(sync_commits), 2),
            "commits_per_step_pipelined": round(med(pipe_commits), 2),
            "speedup_wait": round(med(naive) / med(sync), 2),
            "speedup_pipelined": round(med(naive) / med(pipelined), 2),
        },
        f"claims_per_s_{args.threads}_threads": {
            "one_txn_per_claim": round(med(naive_tp)),
            "nbrunbook_group_commit": round(med(store_tp)),
            "claims_per_commit": round(med(per_commit), 1),
            "speedup": round(med(store_tp) / med(naive_tp), 2),
        },
        "contract_floor_ms": {
            "pipelined_step": round(med(f["pipelined_step"] for f in floors), 3),
            "group_of_8_claims": round(med(f["group_of_8"] for f in floors), 3),
            "ceiling_claims_per_s_8_threads": round(8000 / med(f["group_of_8"] for f in floors)),
        },
        "rounds": args.repeat,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
