"""The command-line tools, a module each: ``kqueue-send``, ``kqueue-work``, ``kqueue``; thin layers over the library."""

from __future__ import annotations

from kqueue.cli.admin import admin_main
from kqueue.cli.send import send_main
from kqueue.cli.work import work_main

__all__ = ["admin_main", "send_main", "work_main"]
