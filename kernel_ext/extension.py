"""``%load_ext nbrunbook`` / ``%unload_ext nbrunbook``: install and remove every hook.

Loading is cheap on purpose (DESIGN.md §10): nothing here imports DuckDB,
nbformat, pyarrow or ipywidgets; the store opens at ``%runbook start`` /
``attach``.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from typing import Any

from .guard import Guard

_GUARDS: weakref.WeakKeyDictionary[Any, Guard] = weakref.WeakKeyDictionary()
_MAGICS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

#: The module name ``%load_ext`` is given (IPython's ExtensionManager keys its ``loaded`` set by it).
MODULE = "nbrunbook"
# `%load_ext nbrunbook` or run_line_magic('load_ext', 'nbrunbook') - not %unload_ext / %reload_ext.
_LOAD_EXT = re.compile(r"(?<![\w])load_ext['\"]?[\s,]+['\"]?nbrunbook(?![\w.])")


def _quiet_repeated_load(shell: Any) -> Callable[[Any], None]:
    """A pre-cell step (the guard's ``before_cell``): re-running ``%load_ext nbrunbook`` is silent.

    IPython's ``%load_ext`` prints "The nbrunbook extension is already loaded.
    To reload it, use: %reload_ext nbrunbook" for a name in its ``loaded`` set,
    and a start cell is run again on every resume. Just before such a cell
    runs, the name leaves the set: IPython then calls our (idempotent) load
    function, which finds the hooks installed and does nothing, and puts the
    name back. ``%unload_ext`` / ``%reload_ext`` keep working.
    """

    def hook(info: Any) -> None:
        raw = getattr(info, "raw_cell", None)
        if isinstance(raw, str) and "load_ext" in raw and _LOAD_EXT.search(raw):
            manager = getattr(shell, "extension_manager", None)
            loaded = getattr(manager, "loaded", None)
            if isinstance(loaded, set):
                loaded.discard(MODULE)

    return hook


def load_ipython_extension(shell: Any) -> None:
    """Register the ``%runbook`` magics and the cell guard on ``shell``."""
    if shell in _GUARDS:
        return
    from .magics import RunbookMagics

    guard = Guard(shell)
    guard.register()
    magics = RunbookMagics(shell=shell, guard=guard)  # Magics.__init__ adds it to shell.configurables
    shell.register_magics(magics)
    _GUARDS[shell] = guard
    _MAGICS[shell] = magics
    guard.before_cell = _quiet_repeated_load(shell)


def unload_ipython_extension(shell: Any) -> None:
    """Remove the guard's hooks, the magics and the config entry; detach the instance."""
    guard = _GUARDS.pop(shell, None)
    magics = _MAGICS.pop(shell, None)
    if guard is not None:
        guard.unregister()
    if magics is not None:
        manager = shell.magics_manager
        for kind, table in magics.magics.items():
            for name, fn in table.items():
                if manager.magics.get(kind, {}).get(name) == fn:
                    del manager.magics[kind][name]
        manager.registry.pop(type(magics).__name__, None)
        while magics in shell.configurables:
            shell.configurables.remove(magics)


def guard_for(shell: Any, *, load: bool = False) -> Guard:
    """The guard installed on ``shell``; with ``load=True`` load the extension first if needed."""
    guard = _GUARDS.get(shell)
    if guard is None and load:
        # Not through the extension manager: a notebook's own `%load_ext nbrunbook`
        # (run after a runner attached) must load quietly, not say "already loaded".
        load_ipython_extension(shell)
        guard = _GUARDS.get(shell)
    if guard is None:
        raise LookupError("the nbrunbook extension is not loaded in this shell (%load_ext nbrunbook)")
    return guard


def is_loaded(shell: Any) -> bool:
    """True if the extension's hooks are installed on ``shell``."""
    return shell in _GUARDS
