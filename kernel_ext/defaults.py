"""Default limits and policies, shared by the ``%runbook`` traits and :class:`~.session.Options`.

Kept in a module of constants so that ``%load_ext nbrunbook`` imports nothing else to build the magics.
"""

from __future__ import annotations

#: Seconds a cell waits for the same cell running in another kernel.
WAIT_TIMEOUT = 600.0
#: What a done cell whose source changed does: skip (with a warning), error or rerun.
ON_CHANGED = ("error", "rerun", "skip")
#: Bytes of output recorded per cell.
OUTPUT_LIMIT = 1024 * 1024
#: Bytes per saved value.
VALUE_LIMIT = 1024 * 1024
