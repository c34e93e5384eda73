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


def open_store(path_or_url: str | os.PathLike[str] | None = None) -> Store:
    """Open a store.

    ``embedded:PATH`` (or ``duckdb:PATH``) opens the DuckDB file in this
    process; a plain path does the same until the store server lands. ``None``
    means :func:`default_store_path`.
    """
    target = os.fspath(path_or_url) if path_or_url is not None else default_store_path()
    for prefix in ("embedded:", "duckdb:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    from .embedded import EmbeddedStore

    return EmbeddedStore(target)
