"""Redis with delays: Kombu's transport, with a sorted set per queue for the messages not due yet.

A delayed message goes into ``kqueue.delayed:<queue>``, scored by the Unix
time it is due. A consumer moves what is due to the back of its queue's list
with one script (atomic, so two consumers never move one message twice)
before a ``BRPOP`` once the next is due, and looks again at least every
`DUE_LOOK` seconds, for delays that other processes sent: its ``BRPOP``
waits no longer than that. Messages without a delay take Kombu's own path.
"""

from __future__ import annotations

import math
import time
from typing import Any

from kombu.transport import redis
from kombu.utils.json import dumps

from kqueue.delays import not_before_of

__all__ = ["Channel", "Transport", "delayed_count", "delayed_key"]

#: Due messages moved at once, at most; the rest go with the next BRPOP, at once.
MOVE_BATCH = 100
#: Seconds between a consumer's looks for delayed messages, and the longest it blocks in BRPOP.
DUE_LOOK = 0.25

_MOVE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, message in ipairs(due) do
    redis.call('LPUSH', KEYS[2], message)
end
if #due > 0 then
    redis.call('ZREM', KEYS[1], unpack(due))
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return next[2]
"""


def delayed_key(queue: str) -> str:
    return f"kqueue.delayed:{queue}"


class Channel(redis.Channel):  # type: ignore[misc]
    """Kombu's Redis channel; a message whose `NOT_BEFORE` is ahead waits in a sorted set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._move_script: Any = None
        self._next_due = 0.0  # Unix time the next delayed message of the active queues is due; 0: not known
        self._looked = 0.0

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        not_before = not_before_of(message)
        if not_before is None or not_before <= time.time():
            super()._put(queue, message, **kwargs)
            return
        kwargs.pop("_publish_batch", None)
        with self.conn_or_acquire() as client:
            client.zadd(delayed_key(queue), {dumps(message): not_before})

    def _move_due(self, queues: list[str]) -> float:
        """Move what is due of `queues` into them, if anything may be; seconds until the next is due (inf: none)."""
        now = time.time()
        if self._next_due > now and time.monotonic() - self._looked < DUE_LOOK:
            return self._next_due - now
        soonest = math.inf
        with self.conn_or_acquire() as client:
            if self._move_script is None:
                self._move_script = client.register_script(_MOVE)
            for queue in queues:
                nxt = self._move_script(keys=[delayed_key(queue), queue], args=[now, MOVE_BATCH], client=client)
                if nxt is not None:
                    soonest = min(soonest, float(nxt))
        self._next_due, self._looked = soonest, time.monotonic()
        return soonest - now

    def _brpop_start(self, timeout: float | None = None) -> None:
        due_in = self._move_due(list(self.active_queues))
        # Redis takes a BRPOP timeout in seconds with decimals (6.0 and later); 0 would block for ever.
        super()._brpop_start(min(timeout or self.brpop_timeout, DUE_LOOK, max(0.01, due_in)))

    def _get(self, queue: str) -> Any:
        self._next_due = 0.0  # a one-off get (kqueue stat, dead letters): always look
        self._move_due([queue])
        return super()._get(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        super()._delete(queue, *args, **kwargs)
        with self.conn_or_acquire() as client:
            client.delete(delayed_key(queue))


class Transport(redis.Transport):  # type: ignore[misc]
    """Kombu's Redis transport, with delays (see the module)."""

    Channel = Channel
    #: What URLs and log lines call it.
    scheme = "redis"


def delayed_count(channel: Any, queue: str) -> int:
    """Delayed messages of `queue` (due ones not yet moved included)."""
    with channel.conn_or_acquire() as client:
        return int(client.zcard(delayed_key(queue)))
