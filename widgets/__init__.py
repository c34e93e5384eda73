"""Dashboards (ipywidgets): :class:`InstanceDashboard` and :class:`StoreDashboard`.

Imported lazily: ipywidgets loads only when a dashboard is built.
"""

from __future__ import annotations

from typing import Any

__all__ = ["InstanceDashboard", "InstanceView", "StoreDashboard"]

_LAZY = {
    "InstanceDashboard": "nbrunbook.widgets.instance",
    "StoreDashboard": "nbrunbook.widgets.store_view",
    "InstanceView": "nbrunbook.widgets.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbrunbook.widgets' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
