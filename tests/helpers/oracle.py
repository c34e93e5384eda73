"""Invariant oracles over the journal, the cursor and an effects file (DESIGN.md §11).

Tests call :func:`check_store` after concurrency and crash scenarios; it
raises ``AssertionError`` naming the first violation.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from nbrunbook.engine.keys import split_step_key
from nbrunbook.engine.model import Event, StepState
from nbrunbook.engine.store import Store

# The event that must end the journal history of each cursor status.
_STATUS_EVENTS = {
    "running": {"claimed"},
    "done": {"done", "resolved"},
    "failed": {"failed"},
    "interrupted": {"interrupted"},
    "skipped": {"resolved"},
    "pending": {"reopened", "resolved"},
}
TRANSITIONS = {"claimed", "done", "failed", "interrupted", "reopened", "resolved"}


def check_seq(events: list[Event]) -> None:
    """seq is 1, 2, 3, ... with no gap and no repeat."""
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq not gap-free/unique: {seqs[:20]}..."


def check_no_event_after_done(events: list[Event]) -> None:
    """After ``done`` (or a resolved done/skip) for a key, only ``fenced`` may follow."""
    finished: set[str] = set()
    for e in events:
        if e.step_key in finished and e.event != "fenced":
            raise AssertionError(f"event {e.event} (seq {e.seq}) after done for {e.step_key}")
        if e.event == "done" or (e.event == "resolved" and e.payload.get("decision") in ("done", "skip")):
            assert e.step_key is not None
            finished.add(e.step_key)


def check_claims(events: list[Event]) -> None:
    """One ``claimed`` per (key, epoch); attempts count 1, 2, ... per key; epochs rise per path."""
    claims = Counter((e.step_key, e.epoch) for e in events if e.event == "claimed")
    dup = [k for k, n in claims.items() if n > 1]
    assert not dup, f"several claims for one (step key, epoch): {dup}"
    attempts: dict[str, list[int]] = defaultdict(list)
    epochs: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if e.event == "claimed":
            assert e.step_key and e.attempt is not None and e.epoch is not None
            attempts[e.step_key].append(e.attempt)
            epochs[split_step_key(e.step_key)[0]].append(e.epoch)
    for key, seen in attempts.items():
        assert seen == list(range(1, len(seen) + 1)), f"attempts of {key}: {seen}"
    for path, seen in epochs.items():
        assert seen == sorted(set(seen)), f"epochs of {path} not strictly rising: {seen}"


def check_invocations(events: list[Event]) -> None:
    """Invocation moves only with ``reopened``, by exactly one."""
    current: dict[str, int] = {}
    for e in events:
        if not e.step_key:
            continue
        path, inv = split_step_key(e.step_key)
        if e.event == "reopened":
            assert inv == current.get(path, 1) + 1, f"reopened jumps to {e.step_key} from {current.get(path)}"
            current[path] = inv
        elif e.event in TRANSITIONS:
            assert inv == current.get(path, 1), (
                f"{e.event} on {e.step_key} but current invocation is {current.get(path, 1)}"
            )


def check_cursor_matches_journal(steps: list[StepState], events: list[Event]) -> None:
    """Every cursor row agrees with the last transition event of its path."""
    last: dict[str, Event] = {}
    for e in events:
        if e.step_key and e.event in TRANSITIONS:
            last[split_step_key(e.step_key)[0]] = e
    for s in steps:
        ev = last.get(s.path)
        assert ev is not None, f"cursor row {s.path} has no journal history"
        assert ev.step_key == s.step_key, f"cursor {s.path} at {s.step_key}, journal at {ev.step_key}"
        assert ev.event in _STATUS_EVENTS[s.status], f"cursor {s.path} is {s.status} but last event is {ev.event}"
        if s.status == "running":
            assert (ev.owner, ev.epoch) == (s.owner, s.epoch), f"{s.path}: holder differs from its claim"
    paths = {s.path for s in steps}
    orphans = [p for p in last if p not in paths]
    assert not orphans, f"journal history without cursor rows: {orphans[:5]}"


def check_store(store: Store, instance_id: str) -> list[Event]:
    """Every journal/cursor invariant for one instance; returns the journal."""
    events = store.journal(instance_id)
    check_seq(events)
    check_no_event_after_done(events)
    check_claims(events)
    check_invocations(events)
    check_cursor_matches_journal(store.steps(instance_id), events)
    return events


def read_effects(path: Path) -> list[dict[str, Any]]:
    """The lines of an effects file (one JSON object per side effect)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_effects_once(effects: list[dict[str, Any]], events: list[Event], *, key: str = "step_key") -> None:
    """Exactly one effect per done step key unless an attempt of it was interrupted."""
    per_key = Counter(e[key] for e in effects)
    interrupted = {e.step_key for e in events if e.event == "interrupted"}
    done = {e.step_key for e in events if e.event == "done"}
    for k in done:
        n = per_key.get(k, 0)
        if k in interrupted:
            assert n >= 1, f"{k} is done but has no effect"
        else:
            assert n == 1, f"{k}: {n} effects for one done step"
