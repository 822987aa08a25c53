"""The ``sqlite://`` URL: which file, and the options of its query string."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from kqueue.errors import KQueueError

__all__ = ["Options", "path_of"]

_NOT_SHARED = (
    "broker URL {url!r} names no database file other processes can share: "
    "use sqlite:///relative/path.db or sqlite:////absolute/path.db"
)


@dataclass(frozen=True)
class Options:
    """What a ``sqlite://`` URL or the transport options may set.

    Attributes:
        busy_timeout: seconds to wait for another process's write to finish.
        confirm_batch: in confirm mode, messages committed together.
    """

    busy_timeout: float = 10.0
    confirm_batch: int = 500

    @classmethod
    def parse(cls, url: str, transport_options: dict[str, Any]) -> Options:
        """Options from the URL's query string, over those in `transport_options`.

        Raises:
            KQueueError: an unknown option, or a value that is not a positive number.
        """
        given: dict[str, Any] = {k: v for k, v in transport_options.items() if k in ("busy_timeout", "confirm_batch")}
        for key, value in parse_qsl(urlsplit(url).query):
            if key not in ("busy_timeout", "confirm_batch"):
                raise KQueueError(
                    f"broker URL {url!r} has an unknown option {key}: sqlite:// takes busy_timeout and confirm_batch"
                )
            given[key] = value
        try:
            options = cls(float(given.get("busy_timeout", cls.busy_timeout)), int(given.get("confirm_batch", 500)))
        except ValueError as exc:
            raise KQueueError(f"broker URL {url!r}: an option is not a number ({exc})") from None
        if options.busy_timeout <= 0 or options.confirm_batch < 1:
            raise KQueueError(f"broker URL {url!r}: busy_timeout and confirm_batch must be positive")
        return options


def path_of(url: str) -> Path:
    """The database file a ``sqlite://`` URL names, made absolute.

    Three slashes before a relative path, four before an absolute one, as in SQLAlchemy.

    Raises:
        KQueueError: the URL names no file, an in-memory database, or a host.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise KQueueError(f"broker URL {url!r} is not a sqlite:// URL")
    if parts.netloc:
        raise KQueueError(
            f"broker URL {url!r} names a host ({parts.netloc}), but a SQLite database is a local file: "
            "use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    name = parts.path[1:]
    memory = name in ("", ":memory:") or name.startswith("file:") or "mode=memory" in parts.query
    if memory or name.endswith("/"):
        raise KQueueError(_NOT_SHARED.format(url=url))
    return Path(os.path.abspath(name))
