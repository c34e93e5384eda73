"""Fan-out benchmark (DESIGN.md §10): durable no-op branches vs a plain thread pool.

    python bench/bench_branches.py [--branches N] [--workers W] [--repeat R] [--store embedded|server]

In one process, alternating, ``--repeat`` rounds of:

- baseline: ``ThreadPoolExecutor(W).map(noop, range(N))`` - no durability;
- nbrunbook: ``rb.map(noop, range(N), max_workers=W)`` inside a claimed cell -
  every branch claimed (in chunks), run with its own context, and its result
  recorded (``done`` event + value), durable before the call returns.

Each nbrunbook round uses a fresh cell, checks that all N branches are done
and the journal is gap-free, and reports the writer's commits. Prints one
JSON object (medians); BENCHMARKS.md records it with the command line.
Target: >= 3,000 durable branches/s with 8 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbrunbook as rb
from nbrunbook.engine import context
from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import process_owner
from nbrunbook.engine.model import ClaimOutcome
from nbrunbook.engine.store import Store


def noop(item: int) -> None:
    return None


def baseline(n: int, workers: int) -> float:
    """Seconds for N no-op calls through a plain thread pool."""
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(noop, range(n)):
            pass
    return time.perf_counter() - t


def durable(store: Store, iid: str, cell: str, n: int, workers: int) -> tuple[float, int]:
    """Seconds for N durable branches in one claimed cell; also the writer commits used."""
    me = process_owner()
    claim = store.claim(iid, f"cell/{cell}", owner=me, run_id="bench")
    assert claim.outcome is ClaimOutcome.CLAIMED
    st = claim.state
    ctx = context.StepContext(
        iid, claim.step_key, st.invocation, st.attempt, st.epoch, claim.idempotency_key, {}, "bench", me, store
    )
    writer = getattr(store, "writer", None)
    groups_before = writer.groups if writer is not None else 0
    t = time.perf_counter()
    with context.bound(ctx):
        results = rb.map(noop, range(n), max_workers=workers)
    elapsed = time.perf_counter() - t
    groups = (writer.groups if writer is not None else 0) - groups_before
    store.complete(iid, claim.step_key, owner=me, epoch=st.epoch, run_id="bench")
    assert results == [None] * n
    done = [s for s in store.steps(iid, parent=claim.step_key) if s.status == "done"]
    assert len(done) == n, f"{len(done)} of {n} branches done"
    return elapsed, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--store", choices=["embedded", "server"], default="embedded")
    args = parser.parse_args()
    n, w = args.branches, args.workers
    with tempfile.TemporaryDirectory(prefix="nbrb-bench-") as tmp:
        store = open_store(f"{args.store}:{Path(tmp) / 'store.duckdb'}")
        store.open_instance("bench", "fan", {}, manifest_version=0, owner=process_owner(), run_id="bench")
        base: list[float] = []
        ours: list[float] = []
        commits: list[int] = []
        durable(store, "fan", "warmup", min(n, 500), w)
        for r in range(args.repeat):
            if r % 2:
                elapsed, groups = durable(store, "fan", f"c{r}", n, w)
                base.append(baseline(n, w))
            else:
                base.append(baseline(n, w))
                elapsed, groups = durable(store, "fan", f"c{r}", n, w)
            ours.append(elapsed)
            commits.append(groups)
        events = store.journal("fan")
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), "journal seq not gap-free"
        store.close()
        if args.store == "server":
            from nbrunbook.engine.launch import stop_server

            stop_server(Path(tmp) / "store.duckdb")  # the server this run started
    t_base, t_ours = statistics.median(base), statistics.median(ours)
    report: dict[str, Any] = {
        "benchmark": "bench_branches",
        "store": args.store,
        "branches": n,
        "workers": w,
        "repeat": args.repeat,
        "threadpool_per_s": round(n / t_base),
        "durable_per_s": round(n / t_ours),
        "durable_seconds": round(t_ours, 3),
        "threadpool_seconds": round(t_base, 4),
        "slowdown_vs_threadpool": round(t_ours / t_base, 1),
        "commits_per_round": statistics.median(commits) if args.store == "embedded" else None,
        "target_per_s": 3000,
        "meets_target": n / t_ours >= 3000,
        "rounds_durable_per_s": [round(n / t) for t in ours],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
