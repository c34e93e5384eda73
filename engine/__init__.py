"""The engine: store interface and implementations, claims, server, runner, CLI."""

from .errors import RunbookError
from .factory import open_store
from .store import Store

__all__ = ["RunbookError", "Store", "open_store"]
