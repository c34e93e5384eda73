"""Helpers shared by the CLI subcommand modules."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from typing import Any

from .factory import default_store_path, open_store
from .model import Event
from .store import Store


def add_store_arg(p: argparse.ArgumentParser) -> None:
    """``--store S`` (every command has it)."""
    p.add_argument(
        "--store",
        default=None,
        metavar="S",
        help="store path or URL (default: $NBRUNBOOK_STORE, else .nbrunbook/store.duckdb here)",
    )


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """``--json`` (every read command has it)."""
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def store_from(args: argparse.Namespace) -> Store:
    """Open the store named by ``--store`` (or the default)."""
    return open_store(args.store or default_store_path())


def step_path(cell: str) -> str:
    """A CELL argument as a step path: a cell id, or a step path/key as given."""
    if "/" in cell:
        path, _, inv = cell.rpartition("@")
        return path if inv.isdigit() and "/" in path else cell
    return f"cell/{cell}"


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with milliseconds."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_json(e: Event) -> dict[str, Any]:
    """The fields ``journal --json`` promises (DESIGN.md §9)."""
    return {
        "instance_id": e.instance_id,
        "seq": e.seq,
        "step_key": e.step_key,
        "event": e.event,
        "invocation": e.invocation,
        "attempt": e.attempt,
        "epoch": e.epoch,
        "owner": e.owner,
        "run_id": e.run_id,
        "ts": iso(e.ts),
        "payload": e.payload,
    }


def dumps(obj: Any) -> str:
    """JSON for CLI output."""
    return json.dumps(obj, sort_keys=True, default=str)


def short_duration(seconds: float | None) -> str:
    """``0.3s``, ``12s``, ``4m05s``, ``1h02m``."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
