"""The command-line tools, a module each: ``kqueue-send``, ``kqueue-work``, ``kqueue``; thin layers over the library.

Each tool imports its own module only, so that a worker starts without the admin tool's imports.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["admin_main", "send_main", "work_main"]

_MODULES = {"admin_main": "kqueue.cli.admin", "send_main": "kqueue.cli.send", "work_main": "kqueue.cli.work"}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_MODULES[name]), name)
