"""Store server benchmarks (DESIGN.md §10), each against a baseline in the same run.

    python bench/bench_server.py [--processes 8] [--claims 300] [--repeat 3]

1. claims/s with N client processes on distinct steps of one instance:
   - baseline: open-per-transaction DuckDB - each process opens the file
     (retrying while another holds it), claims one step in one transaction
     (cursor row + journal event, seq = max + 1) and closes it again;
   - nbrunbook: every process a ``server:`` client of one store server.
   Processes wait on a pipe and are released together; the rate is all
   claims over the span from the first start to the last finish.
2. Round trip of one claim, sequential, in one process: embedded store vs
   the same claim through the server, alternating claim by claim; what the
   server adds is the median of the paired differences. Plus a no-op
   request to show the bare transport.

Prints one JSON object. Medians over ``--repeat`` rounds, alternating order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OWNER = "bench@bench-host:1:abc"


# ------------------------------------------------------------------ workers


def worker(kind: str, store: str, wid: int, claims: int, barrier: int) -> None:
    """One client process: wait for the barrier, claim ``claims`` steps, report times."""
    if kind == "server":
        from nbrunbook.engine.factory import open_store
        from nbrunbook.engine.model import ClaimOutcome

        s = open_store(f"server:{store}")
        s.get_instance("bench")  # connected before the clock starts
        print("ready", flush=True)
        os.read(barrier, 1)
        t0 = time.monotonic()
        for i in range(claims):
            c = s.claim("bench", f"cell/w{wid}-{i}", owner=OWNER, run_id="r")
            assert c.outcome is ClaimOutcome.CLAIMED, c
        t1 = time.monotonic()
        s.close()
    else:
        import duckdb

        from nbrunbook.engine.dbfile import DUCKDB_CONFIG

        print("ready", flush=True)
        os.read(barrier, 1)
        t0 = time.monotonic()
        deadline = t0 + 600
        errors = 0
        i = 0
        while i < claims:
            try:
                con = duckdb.connect(store, config=DUCKDB_CONFIG)
            except duckdb.IOException as exc:
                # Another process holds the file: a failed open does not wait, so retry.
                if "Could not set lock" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
                continue
            try:
                _naive_claim(con, f"cell/w{wid}-{i}-{errors}")  # a fresh step after a failed try
                i += 1
            except duckdb.Error:
                # Files opened and closed by turns in several processes do fail now
                # and then (e.g. "Could not read enough bytes"): count it, try again.
                errors += 1
                if errors > 50 or time.monotonic() > deadline:
                    raise
            finally:
                con.close()
        t1 = time.monotonic()
        print(json.dumps({"t0": t0, "t1": t1, "claims": claims, "errors": errors}), flush=True)
        return
    print(json.dumps({"t0": t0, "t1": t1, "claims": claims}), flush=True)


def _naive_claim(con: Any, step: str) -> None:
    """One claim in one transaction: cursor row + journal event, seq = max + 1."""
    con.execute("BEGIN TRANSACTION")
    seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM journal WHERE instance_id = 'bench'").fetchone()
    now = time.time()
    con.execute(
        "INSERT INTO cursor VALUES ('bench', ?, NULL, 1, 1, 1, 'running', ?, 'r', NULL, ?, ?, NULL)",
        [step, OWNER, now + 30, now],
    )
    con.execute(
        "INSERT INTO journal VALUES ('bench', ?, ?, 'claimed', 1, 1, 1, ?, 'r', ?, '{}')",
        [seq[0] if seq else 1, step + "@1", OWNER, now],
    )
    con.execute("COMMIT")


def processes_rate(kind: str, store: Path, processes: int, claims: int) -> float:
    """Claims/s of ``processes`` client processes released together."""
    r, w = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, str(store), str(n), str(claims), str(r)],
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(r,),
        )
        for n in range(processes)
    ]
    os.close(r)
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    os.close(w)  # go
    reports = []
    for p in procs:
        assert p.stdout is not None
        reports.append(json.loads(p.stdout.readline()))
        assert p.wait() == 0
        p.stdout.close()
    span = max(x["t1"] for x in reports) - min(x["t0"] for x in reports)
    _ERRORS[kind] = _ERRORS.get(kind, 0) + sum(x.get("errors", 0) for x in reports)
    return sum(x["claims"] for x in reports) / span


_ERRORS: dict[str, int] = {}


# --------------------------------------------------------------- round trip


def roundtrips(store_dir: Path, n: int, repeat: int) -> dict[str, Any]:
    """Median ms of one sequential claim: embedded, through the server, their paired difference, a no-op.

    Claims alternate one by one between the two stores (embedded, server,
    server, embedded, ...), so each server claim has an embedded neighbour
    taken under the same machine conditions; the added cost is the median of
    those pairwise differences. (Medians of separate blocks of claims moved
    by +-0.5 ms between blocks here, as much as the quantity measured.)
    """
    from nbrunbook.engine.embedded import EmbeddedStore
    from nbrunbook.engine.factory import open_store

    emb = EmbeddedStore(str(store_dir / "rt-embedded.duckdb"))
    srv = open_store(f"server:{store_dir / 'rt-server.duckdb'}")
    for s in (emb, srv):
        s.open_instance("bench", "rt", {}, manifest_version=0, owner=OWNER, run_id="r")
    counter = [0]

    def one_claim(s: object) -> float:
        counter[0] += 1
        t = time.perf_counter()
        c = s.claim("rt", f"cell/x{counter[0]}", owner=OWNER, run_id="r")  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - t
        assert c.outcome.value == "claimed"
        return elapsed

    link = srv._link
    malloc = link.call("status", {}).result().get("malloc", "?")

    def ping() -> float:
        t = time.perf_counter()
        link.call("ping", {}).result()
        return time.perf_counter() - t

    for _ in range(20):  # warm both (first instance load, first statements)
        one_claim(emb)
        one_claim(srv)
    results: dict[str, list[float]] = {"embedded": [], "server": [], "added": [], "ping": []}
    for i in range(n * repeat):
        if i % 2 == 0:
            e, s_ = one_claim(emb), one_claim(srv)
        else:
            s_, e = one_claim(srv), one_claim(emb)
        results["embedded"].append(e)
        results["server"].append(s_)
        results["added"].append(s_ - e)
        results["ping"].append(ping())
    emb.close()
    srv.close()
    med = {k: statistics.median(v) * 1e3 for k, v in results.items()}
    return {**med, "malloc": malloc}


@contextlib.contextmanager
def server_in_this_process(instance_id: str) -> Iterator[Path]:
    """A store with ``instance_id`` opened, served by a store server in this process (for the traces).

    The diagnostics wrap the server's methods with timers, so it must run
    here; client processes find its socket instead of starting their own.
    """
    from nbrunbook.engine import server
    from nbrunbook.engine.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory(prefix="nbrb-trace-") as tmp:
        path = Path(tmp) / "trace.duckdb"
        s = EmbeddedStore(str(path))
        s.open_instance("bench", instance_id, {}, manifest_version=0, owner=OWNER, run_id="r")
        s.close()
        srv = server.StoreServer(str(path), log=lambda _m: None)
        thread = threading.Thread(target=srv.serve, daemon=True)
        thread.start()
        time.sleep(1.0)  # listening: the clients find it instead of starting their own
        try:
            yield path
        finally:
            srv.request_stop("trace done")
            thread.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--claims", type=int, default=300, help="claims per process through the server")
    ap.add_argument("--baseline-claims", type=int, default=15, help="claims per process, open-per-transaction")
    ap.add_argument("--roundtrips", type=int, default=200, help="claim pairs per round of the round-trip part")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", nargs=5, metavar=("KIND", "STORE", "ID", "CLAIMS", "FD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, store, wid, claims, fd = args.worker
        worker(kind, store, int(wid), int(claims), int(fd))
        return

    import duckdb

    from nbrunbook.engine import launch
    from nbrunbook.engine.embedded import EmbeddedStore

    server_rates, baseline_rates = [], []
    with tempfile.TemporaryDirectory(prefix="nbrb-bench-") as tmp:
        d = Path(tmp)
        try:
            for r in range(args.repeat):
                for what in ["baseline", "server"] if r % 2 == 0 else ["server", "baseline"]:
                    path = d / f"{what}-{r}.duckdb"
                    s = EmbeddedStore(str(path))  # create the schema and the instance, then let go
                    s.open_instance("bench", "bench", {}, manifest_version=0, owner=OWNER, run_id="r")
                    s.close()
                    if what == "baseline":
                        baseline_rates.append(processes_rate("duckdb", path, args.processes, args.baseline_claims))
                    else:
                        server_rates.append(processes_rate("server", path, args.processes, args.claims))
                        launch.stop_server(path)
            rt = roundtrips(d, args.roundtrips, args.repeat)
        finally:
            for path in d.glob("*.duckdb"):
                launch.stop_server(path)

    med = statistics.median
    result = {
        "machine": (
            f"{platform.machine()} {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, duckdb {duckdb.__version__}"
        ),
        f"claims_per_s_{args.processes}_processes": {
            "open_per_transaction": round(med(baseline_rates), 1),
            "store_server": round(med(server_rates)),
            "speedup": round(med(server_rates) / med(baseline_rates), 1),
            "open_per_transaction_failed_attempts": _ERRORS.get("duckdb", 0),
        },
        "claim_roundtrip_ms": {
            "embedded": round(rt["embedded"], 3),
            "server": round(rt["server"], 3),
            "added_by_server": round(rt["added"], 3),
            "difference_of_medians": round(rt["server"] - rt["embedded"], 3),
            "noop_request": round(rt["ping"], 3),
        },
        # The server's C allocator (engine/allocator.py; NBRUNBOOK_SERVER_MALLOC=system for glibc's);
        # this process, with the embedded store, keeps the one it was started with.
        "server_malloc": rt["malloc"],
        "rounds": args.repeat,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
