"""Branch functions importable by worker processes (process-executor tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import nbrunbook as rb


@dataclass
class Widget:
    """A result that is neither JSON nor Arrow (recordable only with pickle)."""

    size: int


def square_in_worker(n: int) -> dict[str, object]:
    """n squared, with where and as which step it ran."""
    ctx = rb.context()
    return {"square": n * n, "pid": os.getpid(), "key": ctx.step_key, "idem": ctx.idempotency_key}


def fail_on_three(n: int) -> int:
    if n == 3:
        raise ValueError(f"no threes ({os.getpid()})")
    return n


def nested_task(n: int) -> int:
    return int(rb.task(abs, -n))


def make_widget(n: int) -> Widget:
    return Widget(n)


def identity(value: object) -> object:
    return value
