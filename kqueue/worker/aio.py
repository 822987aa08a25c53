"""Where ``async def`` handlers run: one event loop on a thread of its own, shared by every handler thread.

A handler thread that gets a coroutine hands it to the loop and waits for
its end, so ``--concurrency N`` is N coroutines in flight on the one loop (and
a coroutine that blocks, calling ``time.sleep``, holds up the others: use
``await asyncio.sleep``). Its failure, the grace at a stop and the retries
are those of any handler, since the handler thread sees its result or its
error. The loop starts with the first coroutine: a worker of plain functions
has no such thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable
from typing import Any

__all__ = ["EventLoop"]


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class EventLoop:
    """An asyncio loop on a daemon thread, started at the first `run`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, awaitable: Awaitable[Any]) -> Any:
        """Run `awaitable` on the loop, from any other thread, and return its result or raise its error."""
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._started()).result()

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="kqueue-asyncio", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    def close(self, timeout: float = 1.0) -> None:
        """Cancel the coroutines still running (their handler threads see `CancelledError`) and stop the loop.

        Its thread ends within `timeout` seconds, or is left behind, a daemon.
        """
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout)
        except Exception:  # noqa: BLE001 - a coroutine that will not end leaves its daemon thread behind
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


async def _cancel_all() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
