"""``open_store``: pick a store implementation from a path or URL.

This is the only module that knows the implementations; everything above it
(the kernel extension, the runner, the widgets) depends on the
:class:`~nbrunbook.engine.store.Store` interface alone.
"""

from __future__ import annotations

import os
import re

from .errors import RunbookError
from .store import Store

DEFAULT_STORE = os.path.join(".nbrunbook", "store.duckdb")


def default_store_path(notebook_dir: str | None = None) -> str:
    """``$NBRUNBOOK_STORE``, else ``.nbrunbook/store.duckdb`` beside the notebook."""
    env = os.environ.get("NBRUNBOOK_STORE")
    if env:
        return env
    return os.path.join(notebook_dir or os.getcwd(), DEFAULT_STORE)


#: What a plain path (no ``kind:`` prefix) opens: the store server, so that
#: kernels, headless runs and dashboards on one machine can share a store.
PLAIN_PATH_KIND = "server"


#: The store kinds a ``kind:`` prefix may name, kept as data (fsspec's registry idea).
KNOWN_PREFIXES = {"embedded": "embedded", "duckdb": "embedded", "server": "server"}

# A URL scheme: two characters at least, so that a one-letter drive-like prefix
# stays a path; a relative path with a colon can be written ``./a:b``.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class BadStoreSpec(RunbookError, ValueError):
    """A store spec names no store this version can open (an unknown scheme, an empty path)."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"store {spec!r}: {reason}")


def split_location(path_or_url: str | os.PathLike[str] | None) -> tuple[str, str]:
    """``(kind, file)`` of a store spec: ``embedded`` or ``server``, and the file's canonical path.

    Every spelling of one file - relative, absolute, through a symlink, with
    ``embedded:``/``duckdb:``/``server:`` or without - gives the same file
    (its realpath), so two runs that spell a store differently share it. An
    unknown scheme is refused, never taken for a relative path.
    """
    target = os.fspath(path_or_url) if path_or_url is not None else default_store_path()
    kind, path = PLAIN_PATH_KIND, target
    m = _SCHEME.match(target)
    if m:
        scheme = m.group(1).lower()
        if scheme not in KNOWN_PREFIXES:
            known = ", ".join(f"{k}:PATH" for k in KNOWN_PREFIXES)
            raise BadStoreSpec(target, f"unknown store scheme {scheme!r} (use a path, {known})")
        kind, path = KNOWN_PREFIXES[scheme], target[m.end() :]
    if not path:
        raise BadStoreSpec(target, "no file named")
    # realpath: a symlink and its target are one store (and one DuckDB lock).
    return kind, os.path.realpath(os.path.expanduser(path))


def canonical_location(path_or_url: str | os.PathLike[str] | None) -> str:
    """The one spelling of a store: its file's realpath, prefixed ``embedded:`` for in-process access.

    A plain path means the store server (:data:`PLAIN_PATH_KIND`), so it needs
    no prefix; the result opens the same store from any working directory
    (it is handed to the run's kernel).
    """
    kind, path = split_location(path_or_url)
    return path if kind == PLAIN_PATH_KIND else f"{kind}:{path}"


def open_store(path_or_url: str | os.PathLike[str] | None = None) -> Store:
    """Open a store.

    A plain path (or ``server:PATH``) talks to the store server that owns the
    DuckDB file at PATH, starting it if none runs, so several processes can
    share the store; ``embedded:PATH`` (or ``duckdb:PATH``) opens the file in
    this process alone (tests, single-process scripts). ``None`` means
    :func:`default_store_path`. Implementations are imported on first use, so
    a client of the server never imports DuckDB.
    """
    kind, target = split_location(path_or_url)
    if kind == "server":
        from .client import ServerStore

        return ServerStore(target)
    from .embedded import EmbeddedStore

    return EmbeddedStore(target)
