"""A bounded in-memory cache of recorded step values.

A step's values are written once, in the transaction of its ``done``, and
never updated or deleted (``step_values`` is write-once per step key), so a
cached copy can never go stale: there is nothing to invalidate. The writer
puts each group's values in after its commit; reads put in what they found.
A skipped cell then costs no DuckDB query (one costs ~0.5-1 ms here), which
is most of a skip through the store server.

Empty results are not cached: a step that has no values yet may get them
when it completes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .model import EncodedValue

#: Memory the cache may hold (the bytes of the values it keeps).
DEFAULT_MAX_BYTES = 64 << 20
#: Steps whose values are larger than this are not cached (a data frame).
DEFAULT_MAX_ENTRY = 1 << 20


class ValueCache:
    """LRU of ``(instance_id, step_key) -> {name: EncodedValue}``, bounded in bytes. Thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry: int = DEFAULT_MAX_ENTRY) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_entry
        self._entries: OrderedDict[tuple[str, str], tuple[dict[str, EncodedValue], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, instance_id: str, step_key: str) -> dict[str, EncodedValue] | None:
        """A copy of the cached values, or ``None`` if they are not cached."""
        key = (instance_id, step_key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return dict(entry[0])

    def put(self, instance_id: str, step_key: str, values: dict[str, EncodedValue]) -> None:
        """Remember a step's complete values (never a part of them; empty ones are ignored)."""
        size = sum(len(v.data) + len(name) for name, v in values.items())
        if not values or size > self.max_entry:
            return
        key = (instance_id, step_key)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (dict(values), size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._entries:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
