"""An application's tasks, as users' own would be, for ``kqueue-work --app tests.apps``."""

from __future__ import annotations

import asyncio
import time

import kqueue

app = kqueue.App()


@app.task
def stamp_call(label: str, *, size: int = 0) -> None:
    """Print 'ran LABEL SIZE AT', AT the Unix time it started."""
    print(f"ran {label} {size} {time.time():.6f}", flush=True)


@app.task(max_retries=0)
async def astamp(label: str, pause: float = 0.0) -> None:
    """The same from a coroutine, after `pause` seconds; 'bad' fails."""
    await asyncio.sleep(pause)
    if label == "bad":
        raise ValueError(f"cannot stamp {label!r}")
    print(f"ran {label} async {time.time():.6f}", flush=True)
