"""A client process of the store server, for the tests in ``test_server_*.py``.

Usage: python server_client.py MODE STORE ARGS...

* ``race STORE INSTANCE WORKDIR CLIENTS FD...`` - advance steps ``cell/s0`` ..
  ``cell/s49``; before steps 0, 10, 20, 30, 40 print ``{"ready": step}`` and
  block on the next barrier FD until the test closes its other end. A winner
  of a barrier step holds its claim until every other client reported, in
  ``WORKDIR/busy.log``, that it saw the step busy. Prints its log at the end.
* ``stream STORE INSTANCE STEPS EFFECTS`` - advance ``cell/s0`` .. like a
  runner racing others: one line in EFFECTS per claimed step, and an ``ack``
  line on stdout for every claim and outcome the store acknowledged.
* ``hold STORE INSTANCE N LEASE [OWNER]`` - claim ``cell/h0`` .. and keep them; print
  the owner and claims, then obey ``renew`` / ``complete`` lines on stdin until it closes.
* ``open STORE FD`` - wait for the barrier FD, open the store (starting the
  server if needed) and print the server's PID.

Every mode opens ``server:STORE`` and uses this process's real owner id, so
the server's liveness sees the real process.
"""

from __future__ import annotations

import json
import os
import sys
import time

from nbrunbook.engine.factory import open_store
from nbrunbook.engine.keys import new_run_id, process_owner
from nbrunbook.engine.model import ClaimOutcome, EncodedValue
from nbrunbook.engine.store import Store


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def effect(file: str, **fields: object) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(fields) + "\n").encode())  # one small O_APPEND write: never interleaved
    finally:
        os.close(fd)


def race(store: Store, iid: str, workdir: str, clients: int, fds: list[int]) -> None:
    me, run = process_owner(), new_run_id()
    busy_log = os.path.join(workdir, "busy.log")
    log: list[list[str]] = []
    barriers = iter(fds)
    for step in range(50):
        path = f"cell/s{step}"
        barrier = step % 10 == 0
        if barrier:
            say(ready=step)
            os.read(next(barriers), 1)  # end of file when the test closes the write end: all go at once
        c = store.claim(iid, path, owner=me, run_id=run)
        if c.outcome is ClaimOutcome.CLAIMED:
            effect(os.path.join(workdir, "effects.jsonl"), step_key=c.step_key, owner=me, epoch=c.state.epoch)
            if barrier:
                _hold_until_all_saw_busy(busy_log, path, clients - 1)
            value = EncodedValue("json", json.dumps({"by": me}).encode())
            store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=run, values={"r": value})
            log.append([path, "won"])
            continue
        first = True
        while c.outcome is ClaimOutcome.BUSY:
            log.append([path, "busy"])
            if barrier and first:
                effect(busy_log, path=path, owner=me)
            first = False
            store.wait(iid, path, timeout=60)
            c = store.claim(iid, path, owner=me, run_id=run)
        assert c.outcome is ClaimOutcome.DONE, c
        by = json.loads(store.values(iid, c.step_key)["r"].data)["by"]
        log.append([path, "result:" + by])
    say(owner=me, log=log)


def _hold_until_all_saw_busy(busy_log: str, path: str, others: int) -> None:
    deadline = time.monotonic() + 300  # a guard against a hung test, not a measurement
    while time.monotonic() < deadline:
        try:
            with open(busy_log) as fh:
                seen = {json.loads(line)["owner"] for line in fh if json.loads(line)["path"] == path}
        except FileNotFoundError:
            seen = set()
        if len(seen) >= others:
            return
        time.sleep(0.005)


def stream(store: Store, iid: str, steps: int, effects: str) -> None:
    me, run = process_owner(), new_run_id()
    unconfirmed: dict[str, object] | None = None  # an outcome sent with wait=False
    futures = []
    for step in range(steps):
        path = f"cell/s{step}"
        c = store.claim(iid, path, owner=me, run_id=run)
        if unconfirmed is not None:
            # A later call of this thread returned: the earlier outcome is durable (ordered).
            say(**unconfirmed)
            unconfirmed = None
        while c.outcome is ClaimOutcome.BUSY:
            store.wait(iid, path, timeout=60)
            c = store.claim(iid, path, owner=me, run_id=run)
        if c.outcome is ClaimOutcome.DONE:
            continue
        assert c.outcome is ClaimOutcome.CLAIMED, c
        say(ack="claimed", step_key=c.step_key, epoch=c.state.epoch, owner=me)
        effect(effects, step_key=c.step_key, owner=me, epoch=c.state.epoch)
        ack = {"ack": "done", "step_key": c.step_key, "epoch": c.state.epoch, "owner": me}
        if step % 2:
            futures.append(store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=run, wait=False))
            unconfirmed = ack
        else:
            store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=run)
            say(**ack)
    store.flush()
    if unconfirmed is not None:
        say(**unconfirmed)
    for f in futures:
        assert f.result(timeout=60).status == "done"  # type: ignore[union-attr]
    say(finished=True)


def hold(store: Store, iid: str, n: int, lease: float, owner: str | None = None) -> None:
    me, run = owner or process_owner(), new_run_id()
    claims = [store.claim(iid, f"cell/h{i}", owner=me, run_id=run, lease=lease) for i in range(n)]
    assert all(c.outcome is ClaimOutcome.CLAIMED for c in claims), claims
    say(owner=me, pid=os.getpid(), keys=[c.step_key for c in claims], epochs=[c.state.epoch for c in claims])
    for line in sys.stdin:  # commands from the test; end of input ends the process
        if line.strip() == "renew":
            states = [store.renew(iid, c.step_key, owner=me, epoch=c.state.epoch, lease=lease) for c in claims]
            say(renewed=[s.status for s in states])
        elif line.strip() == "complete":
            done = [store.complete(iid, c.step_key, owner=me, epoch=c.state.epoch, run_id=run) for c in claims]
            say(completed=[s.status for s in done])  # type: ignore[union-attr]


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    if mode == "open":
        os.read(int(args[0]), 1)
        store = open_store(f"server:{path}")
        store.instances()
        say(server_pid=store.server_info["pid"])  # type: ignore[attr-defined]
        store.close()
        return
    store = open_store(f"server:{path}")
    try:
        if mode == "race":
            race(store, args[0], args[1], int(args[2]), [int(a) for a in args[3:]])
        elif mode == "stream":
            stream(store, args[0], int(args[1]), args[2])
        elif mode == "hold":
            hold(store, args[0], int(args[1]), float(args[2]), *args[3:4])
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        store.close()


if __name__ == "__main__":
    main()
