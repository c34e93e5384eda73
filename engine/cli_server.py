"""``nbrunbook server [start|stop|status]``: the store server from the command line.

Plain ``nbrunbook server`` runs it in the foreground until Ctrl-C (or
SIGTERM); clients also start it on demand, detached, so ``start`` is only
needed to warm it up. ``stop`` ends it gracefully: connected clients keep
their claims and reconnect to the next server (they start one if they need
it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

from .factory import default_store_path, split_location
from .protocol import DEFAULT_IDLE
from .store import DEFAULT_LEASE


def register(sub: Any) -> None:
    """Add the ``server`` subcommand."""
    p = sub.add_parser(
        "server",
        help="run the store server in the foreground, or start/stop/show it",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=("start", "stop", "status"),
        help="start it detached, stop it, or show its status (default: run in the foreground)",
    )
    p.add_argument(
        "--store",
        default=None,
        metavar="S",
        help="store path (default: $NBRUNBOOK_STORE, else .nbrunbook/store.duckdb here)",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (start, status)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"foreground: exit after S seconds with no client (default: never; detached servers: {DEFAULT_IDLE:g})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_LEASE,
        metavar="S",
        help=f"foreground: seconds owners of running steps get to reconnect after a restart ({DEFAULT_LEASE:g})",
    )
    p.set_defaults(func=run)


def _store(args: argparse.Namespace) -> str:
    return split_location(args.store or default_store_path())[1]  # the file, whatever its prefix


def run(args: argparse.Namespace) -> int:
    """Dispatch on the action."""
    path = _store(args)
    if args.action is None:
        return _foreground(path, args)
    from . import launch

    if args.action == "start":
        info = launch.start_detached(path)
        _show(info, args.json, "running")
        return 0
    if args.action == "stop":
        stopped = launch.stop_server(path)
        if args.json:
            print(json.dumps({"stopped": stopped is not None, "pid": (stopped or {}).get("pid")}))
        elif stopped is None:
            print(f"no store server runs for {path}")
        else:
            print(f"stopped the store server of {path} (pid {stopped.get('pid')})")
        return 0
    status = launch.server_status(path)
    if status is None:
        if args.json:
            print(json.dumps({"running": False, "store": path}))
        else:
            print(f"no store server runs for {path}")
        return 1
    _show(status, args.json, "running" if status.get("responding", True) else "not responding")
    return 0


def _show(info: dict[str, Any], as_json: bool, state: str) -> None:
    if as_json:
        print(json.dumps({"running": True, **info}, sort_keys=True, default=str))
        return
    started = info.get("started")
    when = dt.datetime.fromtimestamp(started).isoformat(timespec="seconds") if started else "?"
    print(f"store server {state}: pid {info.get('pid')}, protocol {info.get('protocol')}, since {when}")
    print(f"  store   {info.get('store')}")
    print(f"  socket  {info.get('socket')}")
    if info.get("malloc"):
        print(f"  malloc  {info.get('malloc')}")
    clients = info.get("clients")
    if clients is not None:
        print(f"  clients {len(clients)}" + "".join(f"\n    pid {c['pid']}: {', '.join(c['owners'])}" for c in clients))
    grace = info.get("grace_owners")
    if grace:
        print("  in grace after a restart: " + ", ".join(f"{o} ({s:.0f}s left)" for o, s in grace.items()))


def _foreground(path: str, args: argparse.Namespace) -> int:
    idle = args.idle_timeout if args.idle_timeout is not None else 0.0
    argv = ["--store", path, "--idle-timeout", repr(idle), "--grace", repr(args.grace)]
    from .launch import server_environment

    env = server_environment(path)
    if env != dict(os.environ):
        # The allocator is chosen when a process starts: become a server process that has it
        # (same pid and terminal; its environment then already asks for it, so this runs once).
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "nbrunbook.engine.server", *argv], env)
    from .server import main as server_main

    return server_main(argv)
