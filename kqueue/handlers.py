"""Task handlers: the tutorial's fake work, and loading a handler by its import path."""

from __future__ import annotations

import importlib
import time
import traceback
from collections.abc import Callable
from functools import partial

from kqueue.errors import KQueueError

__all__ = ["Handler", "dots", "load_handler"]

#: A handler takes the task's text. It succeeds by returning and fails by raising.
Handler = Callable[[str], object]


def dots(text: str, dot_seconds: float = 1.0) -> None:
    """The tutorial's fake work: sleep `dot_seconds` for every '.' in the task."""
    seconds = text.count(".") * dot_seconds
    if seconds > 0:  # sleep(0) would still give up the GIL, and wait to get it back
        time.sleep(seconds)


def dot_handler(dot_seconds: float) -> Handler:
    return partial(dots, dot_seconds=dot_seconds)


def load_handler(path: str) -> Handler:
    """The callable at ``module:function``.

    Raises:
        KQueueError: the path is malformed, does not import, or is not callable.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise KQueueError(f"handler {path!r} is not of the form module:function")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise KQueueError(f"handler module {module_name!r} does not import: {_where_it_failed(exc)}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise KQueueError(f"handler {path!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise KQueueError(f"handler {path!r} is not callable")
    return target  # type: ignore[return-value]


def _where_it_failed(exc: BaseException) -> str:
    """``KeyError: 'missing' (at app/tasks.py, line 3)``: the error and the user's line that raised it."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith("<frozen")]
    where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" (at {exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"
