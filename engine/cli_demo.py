"""``nbrunbook demo``: a short tour of the store with no notebook and no kernel."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .cli_common import add_store_arg
from .factory import default_store_path, open_store
from .keys import new_run_id, process_owner
from .model import ClaimOutcome, ManifestCell

STEPS = [("fetch", "download the release notes"), ("notify", "email the on-call team"), ("tag", "tag the release")]


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="advance a three-step demo instance; run it twice to see skips")
    add_store_arg(p)
    p.add_argument("-i", "--instance", default="demo-1", help="instance id (default: demo-1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Claim each step; run the ones not done yet; show the journal."""
    store = open_store(args.store or default_store_path())
    owner, run_id = process_owner(), new_run_id()
    try:
        manifest = store.pin_manifest(
            "demo", [ManifestCell(name, i, name=desc) for i, (name, desc) in enumerate(STEPS)]
        )
        inst, created = store.open_instance(
            "demo", args.instance, {}, manifest_version=manifest.version, owner=owner, run_id=run_id
        )
        print(f"{'created' if created else 'resuming'} instance {inst.instance_id} in {store.location}")
        for name, desc in STEPS:
            claim = store.claim(inst.instance_id, f"cell/{name}", owner=owner, run_id=run_id)
            if claim.outcome is ClaimOutcome.DONE:
                print(f"  skip {name:6s} done earlier by run {claim.state.run_id}")
                continue
            if claim.outcome is not ClaimOutcome.CLAIMED:
                print(f"  {name:6s} {claim.outcome.value}")
                return 1
            time.sleep(0.01)  # the side effect would happen here, exactly once
            store.complete(inst.instance_id, claim.step_key, owner=owner, epoch=claim.state.epoch, run_id=run_id)
            print(f"  ran  {name:6s} {desc} (idempotency key {claim.idempotency_key[:12]}…)")
        print("journal:")
        for e in store.journal(inst.instance_id):
            print(f"  {e.seq:3d} {e.event:16s} {e.step_key or '':12s} run={e.run_id}")
        return 0
    finally:
        store.close()
