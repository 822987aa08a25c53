"""Processes for the sqlite transport's tests: ``python -m tests.sqlite_procs consume|publish URL QUEUE ...``.

Each prints one flushed line per event, so that a test can wait for it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from kombu import Connection, Consumer, Exchange, Queue

import kqueue.sqlite  # noqa: F401 - registers sqlite://


def task_queue(name: str) -> Queue:
    return Queue(name, exchange=Exchange(""), routing_key=name, durable=True)


def say(*words: object) -> None:
    print(*words, flush=True)


def consume(url: str, name: str, prefetch: int, hold: float, limit: int) -> None:
    """Print ``got BODY REDELIVERED COUNT TIME`` per message; ack each after `hold` seconds (never if negative)."""
    done = 0

    def on_message(body: Any, message: Any) -> None:
        nonlocal done
        count = (message.headers or {}).get("x-delivery-count", 0)
        say("got", body, message.delivery_info.get("redelivered"), count, repr(time.time()))
        if hold < 0:
            return
        time.sleep(hold)
        message.ack()
        done += 1

    with Connection(url) as conn:
        with Consumer(conn, [task_queue(name)], callbacks=[on_message], prefetch_count=prefetch, accept=["json"]):
            say("ready")
            while limit <= 0 or done < limit:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
    say("bye")


def publish(url: str, name: str, count: int, confirm: bool, prefix: str) -> None:
    """Publish `count` messages; print ``sent N`` once N of them are committed."""
    queue = task_queue(name)
    with Connection(url) as conn:
        channel = conn.channel()
        queue(channel).declare()
        if confirm:
            channel.confirm_select()
            channel.events["basic_ack"].add(lambda tag, multiple: say("sent", tag))
        producer = conn.Producer(channel)
        for n in range(1, count + 1):
            producer.publish(f"{prefix}{n}", routing_key=name, serializer="json")
            if not confirm:
                say("sent", n)
        if confirm:
            channel.flush()
        channel.close()
    say("bye")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["consume", "publish"])
    parser.add_argument("url")
    parser.add_argument("queue")
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--confirm", action="store_true")
    parser.add_argument("--prefix", default="m")
    args = parser.parse_args(argv)
    if args.role == "consume":
        consume(args.url, args.queue, args.prefetch, args.hold, args.limit)
    else:
        publish(args.url, args.queue, args.count, args.confirm, args.prefix)


if __name__ == "__main__":
    main(sys.argv[1:])
