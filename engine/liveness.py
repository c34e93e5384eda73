"""Owner liveness as the store server sees it (DESIGN.md §3, §4).

An owner is *live* while a client connection speaks for it (it named the
owner in a claim-holding request or its hello), and during the grace period
after a server restart unless its process is provably gone. Once its last
connection ends, or its grace runs out, it is *gone*. Owners the server never
heard of fall back to the local check: gone if their process (same host) no
longer exists, else *unknown* - and then only their lease decides.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from .embedded import LocalLiveness
from .machine import GONE, LIVE, UNKNOWN


class ServerLiveness:
    """Owner liveness as the server sees it: connections, grace after restart, then the local PID check."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[str, set[int]] = {}
        self._grace: dict[str, float] = {}
        self._gone: dict[str, None] = {}  # insertion-ordered, trimmed
        self._local = LocalLiveness()

    def owner_state(self, owner: str) -> str:
        """See :class:`~.machine.Liveness`."""
        with self._lock:
            if self._conns.get(owner):
                return LIVE
            in_grace = self._grace.get(owner, 0.0) > time.monotonic()
            gone = owner in self._gone
        local = self._local.owner_state(owner)
        if in_grace:
            # Counts as live while it may still reconnect, unless its process is provably gone.
            return GONE if local == GONE else LIVE
        if gone:
            return GONE
        return local if local == GONE else UNKNOWN

    def attach(self, owner: str, conn_id: int) -> None:
        """``owner`` speaks through connection ``conn_id`` (it is live while that lasts)."""
        with self._lock:
            self._conns.setdefault(owner, set()).add(conn_id)
            self._grace.pop(owner, None)
            self._gone.pop(owner, None)

    def detach(self, conn_id: int, owners: Sequence[str]) -> list[str]:
        """The connection ended; return the owners left with no connection (now gone)."""
        orphans = []
        with self._lock:
            for owner in owners:
                conns = self._conns.get(owner)
                if conns is None:
                    continue
                conns.discard(conn_id)
                if not conns:
                    del self._conns[owner]
                    self._mark_gone(owner)
                    orphans.append(owner)
        return orphans

    def grant_grace(self, owners: Sequence[str], seconds: float) -> None:
        """Owners of running steps found at start: live for ``seconds`` unless they reconnect."""
        until = time.monotonic() + seconds
        with self._lock:
            for owner in owners:
                if owner not in self._conns:
                    self._grace[owner] = until

    def grace_owners(self) -> dict[str, float]:
        """Owners still in their grace period -> monotonic deadline."""
        with self._lock:
            return dict(self._grace)

    def end_grace(self, now: float) -> list[str]:
        """Owners whose grace ran out without a reconnect (now gone)."""
        with self._lock:
            expired = [o for o, until in self._grace.items() if until <= now]
            for owner in expired:
                del self._grace[owner]
                self._mark_gone(owner)
        return expired

    def connected(self) -> dict[str, int]:
        """Owner -> number of live connections."""
        with self._lock:
            return {o: len(c) for o, c in self._conns.items()}

    def _mark_gone(self, owner: str) -> None:
        self._gone[owner] = None
        while len(self._gone) > 10_000:
            del self._gone[next(iter(self._gone))]
