"""The wire format: how a task's body is read and what kqueue's headers mean."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from kombu.message import Message

from kqueue.producer import Outgoing

__all__ = [
    "ACCEPT",
    "ATTEMPT",
    "DELIVERIES",
    "DIED_AT",
    "ERROR",
    "KQUEUE_PREFIX",
    "NOT_BEFORE",
    "ORIGIN",
    "REASON",
    "REDELIVERED",
    "RETRY_AT",
    "TASK",
    "Delivery",
    "copy_of",
    "decode_call",
    "decode_task",
    "describe_call",
    "encode_call",
]

ACCEPT = ["text/plain", "application/data", "application/json"]
"""Content types a worker accepts: the tutorial's text, bodies from plain AMQP
clients (no content type, which Kombu calls ``application/data``) and JSON.
Never pickle."""

KQUEUE_PREFIX = "x-kqueue-"
"""What kqueue's own headers start with."""
ATTEMPT = "x-kqueue-attempt"
"""Which run of the handler this is: 1 for the first, 2 for the first retry..."""
DELIVERIES = "x-kqueue-deliveries"
"""How many times the task was delivered before this copy of it was published,
counted by kqueue where the queue does not count (quorum queues send
``x-delivery-count``, the deliveries of this very message before this one)."""
REDELIVERED = "x-kqueue-redelivered"
"""The copy stands for a redelivered message (a republished copy is not)."""
NOT_BEFORE = "x-kqueue-not-before"
"""Unix time before which the task must not run: a delayed send, or a retry.
Brokers that keep delays hold the message until then; a worker handed it
early holds or delays it again."""
RETRY_AT = "x-kqueue-retry-at"
"""`NOT_BEFORE` by its former name: still read, no longer written."""
TASK = "x-kqueue-task"
"""On a function task: the name it is registered under. The body is JSON,
``{"args": [...], "kwargs": {...}}``."""
REASON = "x-kqueue-reason"
"""On a dead letter: why it is there (``failed``, ``undecodable``, ``delivery-limit``)."""
ERROR = "x-kqueue-error"
"""On a dead letter: the last error, ``Type: message``."""
ORIGIN = "x-kqueue-queue"
"""On a dead letter: the queue it came from."""
DIED_AT = "x-kqueue-died-at"
"""On a dead letter: the Unix time it was moved to the dead letters."""
QUORUM_DELIVERY_COUNT = "x-delivery-count"
"""RabbitMQ's own count of earlier deliveries, on quorum queues."""


def encode_call(args: Any, kwargs: Any) -> bytes:
    """A function task's body: ``{"args": [...], "kwargs": {...}}``, compact JSON in UTF-8."""
    return json.dumps({"args": args, "kwargs": kwargs}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_call(message: Message) -> tuple[list[Any], dict[str, Any]]:
    """A function task's positional and keyword arguments.

    Raises:
        kombu.exceptions.ContentDisallowed: a content type outside `ACCEPT`.
        kombu.exceptions.DecodeError: a body that is not what its type says.
        ValueError: JSON that is not ``{"args": [...], "kwargs": {...}}``.
    """
    if message.content_type == "application/json":  # as Kombu's decode would, without its registry's lookups
        body = message.body
        payload = json.loads(body if isinstance(body, (bytes, str)) else bytes(body))
    else:
        payload = message.decode()
    if not isinstance(payload, dict):
        raise ValueError(
            f'a function task\'s body is a JSON object {{"args": [...], "kwargs": {{...}}}}, not {payload!r:.80}'
        )
    args, kwargs = payload.get("args", []), payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f"a function task's args are a JSON array and its kwargs an object, not {payload!r:.80}")
    return args, kwargs


def describe_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    """``resize('a.jpg', width=300)``: a function task's call as the tools print it."""
    shown = ", ".join(map(repr, args))
    if kwargs:
        named = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        shown = f"{shown}, {named}" if shown else named
    return f"{name}({shown})"


def headers_of(message: Message) -> dict[str, Any]:
    """A copy of the message's headers (an empty dict when it has none)."""
    return dict(message.headers or {})


def decode_task(message: Message) -> str:
    """The task text of a message.

    Raises:
        kombu.exceptions.ContentDisallowed: a content type outside `ACCEPT`.
        kombu.exceptions.DecodeError: a body that is not what its type says.
    """
    payload = message.decode()
    if isinstance(payload, bytes):  # pragma: no cover - Kombu decodes text types to str
        return payload.decode("utf-8")
    if isinstance(payload, str):
        return payload
    # JSON that is not a string: the handler gets the JSON text itself.
    return json.dumps(payload)


class Delivery(NamedTuple):
    """What kqueue's headers and the broker say about one delivery, read once (a tuple: one per task, made quickly).

    Attributes:
        redelivered: the broker handed it out before (or it is a copy standing for such).
        number: which delivery of the task this is, counting copies.
        uncounted: redelivered by a queue that does not count deliveries: the
            count must be carried in a copy before the task runs again.
        attempt: which run of the handler this would be.
        retry_at: Unix time before which it must not run (`NOT_BEFORE`), or None.
    """

    redelivered: bool
    number: int
    uncounted: bool
    attempt: int
    retry_at: float | None

    @classmethod
    def of(cls, message: Message) -> Delivery:
        """Read what one delivered message says about itself."""
        headers = message.headers or {}
        flagged = bool(message.delivery_info.get("redelivered"))
        if not headers or (len(headers) == 1 and TASK in headers):  # the common case: a fresh task
            return cls(flagged, 2 if flagged else 1, flagged, 1, None)
        uncounted = flagged and QUORUM_DELIVERY_COUNT not in headers
        number = int(headers.get(DELIVERIES, 0)) + int(headers.get(QUORUM_DELIVERY_COUNT, 0)) + 1 + uncounted
        retry_at = headers.get(NOT_BEFORE, headers.get(RETRY_AT))
        return cls(
            flagged or bool(headers.get(REDELIVERED)),
            number,
            uncounted,
            int(headers.get(ATTEMPT, 1)),
            None if retry_at is None else float(retry_at),
        )


#: Headers of a message's way through RabbitMQ's delay queues (the CC key it is routed by, what dead-lettering
#: adds): not carried into a copy.
_BROKERS_OWN = (
    "CC",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)


def copy_of(message: Message, routing_key: str, changes: dict[str, Any]) -> Outgoing:
    """The message's body, content type and headers, with `changes` to the headers.

    A header changed to None is removed. A `NOT_BEFORE` among the headers makes
    the copy a delayed one (`Outgoing.not_before`).
    """
    headers = headers_of(message)
    for key in (QUORUM_DELIVERY_COUNT, *_BROKERS_OWN):
        headers.pop(key, None)
    for key, value in changes.items():
        if value is None:
            headers.pop(key, None)
        else:
            headers[key] = value
    content_type = message.content_type or "application/data"
    encoding = message.content_encoding or ("binary" if not message.content_type else "utf-8")
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode("utf-8")
    not_before = headers.get(NOT_BEFORE)
    return Outgoing(
        body,
        routing_key,
        content_type,
        encoding,
        headers or None,
        not_before=None if not_before is None else float(not_before),
    )
