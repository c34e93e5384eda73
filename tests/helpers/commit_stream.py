"""Child process for crash tests: a stream of claim+complete commits.

Usage: python commit_stream.py STORE INSTANCE N [async]
Prints ``committed <step key>`` after each outcome is known to be durable.
"""

from __future__ import annotations

import sys

from nbrunbook.engine.embedded import EmbeddedStore
from nbrunbook.engine.model import ClaimOutcome, EncodedValue


def main() -> None:
    path, iid, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asynchronous = len(sys.argv) > 4 and sys.argv[4] == "async"
    store = EmbeddedStore(path)
    me = "stream@crash-host:1:abc"
    store.open_instance("rb", iid, {}, manifest_version=0, owner=me, run_id="run-s")
    print("ready", flush=True)
    pending = None
    for i in range(n):
        c = store.claim(iid, f"cell/s{i}", owner=me, run_id="run-s")
        if c.outcome is not ClaimOutcome.CLAIMED:
            continue
        if pending is not None:
            # The claim above returned, so the previous async outcome is durable.
            print(f"committed {pending}", flush=True)
        print(f"claimed {c.step_key}", flush=True)
        value = {"v": EncodedValue("json", str(i).encode())}
        store.complete(
            iid, c.step_key, owner=me, epoch=c.state.epoch, run_id="run-s", values=value, wait=not asynchronous
        )
        if asynchronous:
            pending = c.step_key
        else:
            print(f"committed {c.step_key}", flush=True)
    store.close()
    if pending is not None:
        print(f"committed {pending}", flush=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
