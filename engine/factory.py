"""``open_store``: pick a store implementation from a path or URL.

This is the only module that knows the implementations; everything above it
(the kernel extension, the runner, the widgets) depends on the
:class:`~nbrunbook.engine.store.Store` interface alone.
"""

from __future__ import annotations

import os

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


def split_location(path_or_url: str | os.PathLike[str] | None) -> tuple[str, str]:
    """``(kind, path)`` of a store location: ``embedded``/``duckdb`` or ``server``, and the file."""
    target = os.fspath(path_or_url) if path_or_url is not None else default_store_path()
    for prefix, kind in (("embedded:", "embedded"), ("duckdb:", "embedded"), ("server:", "server")):
        if target.startswith(prefix):
            return kind, target[len(prefix) :]
    return PLAIN_PATH_KIND, target


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
