"""Dashboard refresh cost on a 1M-event journal vs the same refresh at 1k events.

    python bench/bench_dashboard.py [--events 1000000] [--repeat 50]

Two instances are built through the store API in one store file: a small one
(~1k events) and a large one (~``--events``: a cell fanning out to branches,
claimed with ``claim_many`` and completed). For each, a dashboard view is
loaded once; then, ``--repeat`` times, one new event is committed and the
timed part runs: ``InstanceView.refresh()`` (one indexed ``seq > last`` query
and the fold) plus ``store.instance_status()`` (what ``nbrunbook status`` and a
dashboard header read). Prints medians and the large/small ratio as JSON.
Targets (DESIGN.md §10): ≤ 100 ms per refresh at 1M events and at most twice the 1k figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.keys import branch_path, process_owner
from nbrunbook.engine.model import ManifestCell
from nbrunbook.widgets.model import InstanceView

OWNER = process_owner()


def build(store: EmbeddedStore, iid: str, events: int) -> None:
    m = store.pin_manifest("bench", [ManifestCell(f"c{i}", i) for i in range(10)])
    store.open_instance("bench", iid, {}, manifest_version=m.version, owner=OWNER, run_id="r")
    parent = store.claim(iid, "cell/c0", owner=OWNER, run_id="r")
    branches = max(1, (events - 3) // 2)
    chunk = 5000
    for start in range(0, branches, chunk):
        paths = [branch_path(parent.step_key, "m", str(i)) for i in range(start, min(branches, start + chunk))]
        for c in store.claim_many(iid, paths, owner=OWNER, run_id="r"):
            store.complete(iid, c.step_key, owner=OWNER, epoch=c.state.epoch, run_id="r", wait=False)
        store.flush()
    store.complete(iid, parent.step_key, owner=OWNER, epoch=parent.state.epoch, run_id="r")


def measure(store: EmbeddedStore, iid: str, repeat: int) -> tuple[float, float, int]:
    view = InstanceView(store, iid)
    refresh, status = [], []
    for n in range(repeat):
        store.append(iid, "tick", owner=OWNER, run_id="r", payload={"n": n})
        t = time.perf_counter()
        got = view.refresh()
        refresh.append(time.perf_counter() - t)
        assert got == 1
        t = time.perf_counter()
        store.instance_status(iid)
        status.append(time.perf_counter() - t)
    return statistics.median(refresh), statistics.median(status), view.last_seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbrb-dash-") as tmp:
        store = EmbeddedStore(str(Path(tmp) / "s.duckdb"))
        t = time.perf_counter()
        build(store, "small", args.small)
        build(store, "large", args.events)
        built = time.perf_counter() - t
        small = measure(store, "small", args.repeat)
        large = measure(store, "large", args.repeat)
        small2 = measure(store, "small", args.repeat)  # again, after the large one: same conditions
        store.close()
    s_refresh = min(small[0], small2[0])
    s_status = min(small[1], small2[1])
    print(
        json.dumps(
            {
                "events": {"small": small[2], "large": large[2]},
                "build_seconds": round(built, 1),
                "refresh_ms": {
                    "small": round(s_refresh * 1e3, 2),
                    "large": round(large[0] * 1e3, 2),
                    "ratio": round(large[0] / s_refresh, 2),
                },
                "instance_status_ms": {
                    "small": round(s_status * 1e3, 2),
                    "large": round(large[1] * 1e3, 2),
                    "ratio": round(large[1] / s_status, 2),
                },
                "repeat": args.repeat,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
