"""Barrier races: many threads on the same steps; exactly one winner each.

Winners are counted after commit (a claim returns only once committed) and
cross-checked with the journal: one ``claimed`` event per (step key, epoch),
one effect per step in the effects list, losers see busy then the result.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from conftest import owner
from helpers.oracle import check_store
from nbrunbook.engine.model import ClaimOutcome, EncodedValue
from nbrunbook.engine.store import Store

STEPS = 50


@pytest.mark.parametrize("threads", [8, 16])
def test_barrier_race_one_winner_per_step(store: Store, new_instance: Callable[..., str], threads: int) -> None:
    iid = new_instance()
    barrier = threading.Barrier(threads)
    effects: list[tuple[str, str]] = []
    effects_lock = threading.Lock()
    seen: dict[str, list[tuple[str, str]]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        me = owner(f"w{n}")
        log: list[tuple[str, str]] = []
        seen[me] = log
        try:
            for step in range(STEPS):
                path = f"cell/s{step}"
                if step % 10 == 0:
                    barrier.wait()
                c = store.claim(iid, path, owner=me, run_id=f"run-{n}")
                if c.outcome is ClaimOutcome.CLAIMED:
                    with effects_lock:
                        effects.append((c.step_key, me))
                    if step % 10 == 0:
                        # Hold the claim so every racer of this barrier step
                        # arrives while it is running and must see busy.
                        time.sleep(0.3)
                    value = EncodedValue("json", json.dumps({"by": me}).encode())
                    store.complete(
                        iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=f"run-{n}", values={"r": value}
                    )
                    log.append((path, "won"))
                    continue
                while c.outcome is ClaimOutcome.BUSY:
                    log.append((path, "busy"))
                    store.wait(iid, path, timeout=30)
                    c = store.claim(iid, path, owner=me, run_id=f"run-{n}")
                assert c.outcome is ClaimOutcome.DONE, c
                result = store.values(iid, c.step_key)["r"]
                log.append((path, "result:" + json.loads(result.data)["by"]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors

    winners = Counter(key for key, _ in effects)
    assert len(winners) == STEPS and set(winners.values()) == {1}, winners
    by_key = dict(effects)
    for me, log in seen.items():
        for path, what in log:
            if what.startswith("result:"):
                # Every loser saw the winner's recorded result, not its own.
                assert what == f"result:{by_key[path + '@1']}"
        for step in range(0, STEPS, 10):
            path = f"cell/s{step}"
            mine = [w for p, w in log if p == path]
            if mine != ["won"]:
                assert mine[0] == "busy" and mine[-1].startswith("result:"), (me, path, mine)
    events = check_store(store, iid)
    claimed = [e for e in events if e.event == "claimed"]
    assert len(claimed) == STEPS
    assert {(e.step_key, e.owner) for e in claimed} == set(effects)
