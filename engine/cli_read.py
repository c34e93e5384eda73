"""``status``, ``instances``, ``journal``, ``rerun`` and ``resolve`` (DESIGN.md §9)."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

from .cli_common import (
    add_json_arg,
    add_store_arg,
    dumps,
    event_json,
    iso,
    short_duration,
    step_path,
    store_from,
)
from .errors import StepNotFound
from .keys import new_run_id, process_owner
from .model import Event, InstanceStatus


def register(sub: Any) -> None:
    """Add the read and decision commands."""
    p = sub.add_parser("status", help="show an instance: progress and every cell's state")
    p.add_argument("instance", metavar="INSTANCE")
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("instances", help="list the instances in the store")
    p.add_argument("--runbook", metavar="NAME", help="only instances of this runbook")
    p.add_argument("--status", metavar="STATUS", help="only instances in this status")
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_instances)

    p = sub.add_parser("journal", help="print an instance's journal (events in seq order)")
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="only events after this seq")
    p.add_argument("--follow", action="store_true", help="keep printing events as they are committed")
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_journal)

    p = sub.add_parser("rerun", help="open a new invocation of a finished cell (it runs again, with a new key)")
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("cell", metavar="CELL", help="a cell id (or a step key)")
    p.add_argument("--reason", default="", help="recorded in the journal")
    add_store_arg(p)
    p.set_defaults(func=cmd_rerun)

    p = sub.add_parser("resolve", help="decide what happens to an interrupted or failed cell")
    p.add_argument("instance", metavar="INSTANCE")
    p.add_argument("cell", metavar="CELL", help="a cell id (or a step key)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--rerun",
        dest="decision",
        action="store_const",
        const="rerun",
        help="run it again (same key), and its interrupted branches",
    )
    how.add_argument("--done", dest="decision", action="store_const", const="done", help="count it as done")
    how.add_argument("--skip", dest="decision", action="store_const", const="skip", help="skip it")
    p.add_argument("--note", default="", help="recorded in the journal")
    add_store_arg(p)
    p.set_defaults(func=cmd_resolve)


def render_status(st: InstanceStatus) -> str:
    """The text of ``nbrunbook status``."""
    inst = st.instance
    counts = st.counts()
    finished = counts["done"] + counts["skipped"]
    lines = [
        f"instance {inst.instance_id}  runbook {inst.runbook}  status {st.status}",
        f"params   {dumps(inst.params)}",
        f"progress {finished}/{counts['total']} done"
        + "".join(f", {counts[k]} {k}" for k in ("running", "failed", "interrupted") if counts[k]),
    ]
    rows = []
    for cell, state in st.cells():
        rows.append(
            (
                str(cell.index),
                cell.cell_id,
                cell.kind,
                state.status if state else ("-" if cell.kind != "guarded" else "pending"),
                f"{state.invocation}.{state.attempt}" if state else "",
                short_duration(state.duration) if state else "",
                (state.owner or "") if state else "",
                (cell.name or "")[:40],
            )
        )
    if rows:
        head = ("#", "cell", "kind", "status", "inv.att", "took", "owner", "name")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines.append("")
        for r in [head, *rows]:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """``nbrunbook status INSTANCE``."""
    store = store_from(args)
    try:
        st = store.instance_status(args.instance)
    finally:
        store.close()
    if args.json:
        data = st.to_dict()
        data["counts"] = st.counts()
        print(dumps(data))
    else:
        print(render_status(st))
    return 0


def cmd_instances(args: argparse.Namespace) -> int:
    """``nbrunbook instances``."""
    store = store_from(args)
    try:
        found = store.instances(runbook=args.runbook, status=args.status)
    finally:
        store.close()
    if args.json:
        print(dumps([s.to_dict() for s in found]))
        return 0
    for s in found:
        print(f"{s.instance_id}  {s.runbook}  {s.status}  {s.done}/{s.total}  created {iso(s.created_at)}")
    if not found:
        print("no instances", file=sys.stderr)
    return 0


def _print_events(events: list[Event], as_json: bool) -> None:
    for e in events:
        if as_json:
            print(dumps(event_json(e)), flush=True)
        else:
            where = e.step_key or ""
            extra = dumps(e.payload) if e.payload else ""
            print(
                f"{e.seq:6d} {iso(e.ts)} {e.event:16s} {where:28s} {e.owner or ''} {e.run_id or ''} {extra}".rstrip(),
                flush=True,
            )


def cmd_journal(args: argparse.Namespace) -> int:
    """``nbrunbook journal INSTANCE [--since SEQ] [--follow]``."""
    store = store_from(args)
    try:
        store.get_instance(args.instance)  # InstanceNotFound -> exit 2 before printing anything
        if not args.follow:
            _print_events(store.journal(args.instance, since_seq=args.since), args.json)
            return 0
        lock = threading.Lock()

        def show(events: list[Event]) -> None:
            with lock:
                _print_events(events, args.json)

        stop = store.subscribe(args.instance, show, since_seq=args.since)
        try:
            threading.Event().wait()  # until Ctrl-C / SIGTERM
        finally:
            stop()
        return 0
    finally:
        store.close()


def cmd_rerun(args: argparse.Namespace) -> int:
    """``nbrunbook rerun INSTANCE CELL``."""
    store = store_from(args)
    try:
        path = step_path(args.cell)
        if store.step(args.instance, path) is None:
            store.get_instance(args.instance)
            raise StepNotFound(args.instance, path)
        st = store.rerun(args.instance, path, owner=process_owner(), run_id=new_run_id(), reason=args.reason)
    finally:
        store.close()
    print(f"{args.cell}: invocation {st.invocation} opened; it runs again on the next run of {args.instance}")
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    """``nbrunbook resolve INSTANCE CELL --rerun|--done|--skip``."""
    store = store_from(args)
    try:
        path = step_path(args.cell)
        if store.step(args.instance, path) is None:
            store.get_instance(args.instance)
            raise StepNotFound(args.instance, path)
        st = store.resolve(
            args.instance, path, args.decision, owner=process_owner(), run_id=new_run_id(), note=args.note
        )
    finally:
        store.close()
    print(f"{args.cell}: resolved --{args.decision}; now {st.status}")
    return 0
