"""The raw baseline worker: a plain Kombu `ConsumerMixin` that acks in its callback and exits once the queue is empty.

``python -m benchmarks.raw_consumer --broker URL --queue NAME --prefetch N [--queue-type quorum]``
"""

from __future__ import annotations

import argparse
from typing import Any

from kombu import Connection
from kombu.mixins import ConsumerMixin

from benchmarks.plumbing import raw_queue

#: Seconds without a message after which the queue is checked for emptiness.
IDLE = 0.05


class RawWorker(ConsumerMixin):  # type: ignore[misc]
    def __init__(self, connection: Connection, queue_name: str, prefetch: int, queue_type: str) -> None:
        self.connection = connection
        self.queue = raw_queue(queue_name, queue_type)
        self.prefetch = prefetch
        self.handled = 0

    def get_consumers(self, Consumer: Any, channel: Any) -> list[Any]:
        return [
            Consumer(
                queues=[self.queue],
                callbacks=[self.on_message],
                accept=["text/plain"],
                prefetch_count=self.prefetch,
            )
        ]

    def on_message(self, body: Any, message: Any) -> None:
        self.handled += 1
        message.ack()

    def run_until_empty(self) -> int:
        """Consume until, twice in a row after an idle spell, the queue has nothing ready."""
        empty = 0
        with self.consumer_context() as (conn, channel, _consumers):
            while empty < 2:
                try:
                    conn.drain_events(timeout=IDLE)
                    empty = 0
                except TimeoutError:
                    empty = empty + 1 if _ready(channel, self.queue.name) == 0 else 0
        return self.handled


def _ready(channel: Any, name: str) -> int:
    if hasattr(channel, "_size"):
        return int(channel._size(name))
    return int(channel.queue_declare(queue=name, passive=True).message_count)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.raw_consumer")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--queue-type", default="classic", choices=["classic", "quorum"])
    args = parser.parse_args()
    with Connection(args.broker) as conn:
        handled = RawWorker(conn, args.queue, args.prefetch, args.queue_type).run_until_empty()
    print(f"handled {handled}")


if __name__ == "__main__":
    main()
