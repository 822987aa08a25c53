"""Task handlers: the tutorial's fake work, and loading a handler or an app by its import path."""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from kqueue.errors import KQueueError

if TYPE_CHECKING:
    from kqueue.app import App

__all__ = ["Handler", "dots", "load_app", "load_handler"]

#: A handler takes the task's text. It succeeds by returning and fails by raising;
#: an ``async def`` handler's coroutine is run to its end (`kqueue.worker.aio`).
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
    target = _attribute(_module(module_name, "handler"), attribute, path, "handler")
    if not callable(target):
        raise KQueueError(f"handler {path!r} is not callable")
    return target  # type: ignore[no-any-return]


def load_app(path: str) -> App:
    """The `kqueue.App` at ``module:name``, or the one app that ``module`` has.

    Raises:
        KQueueError: the module does not import, or has no such app, or more than one.
    """
    from kqueue.app import App

    module_name, sep, attribute = path.partition(":")
    if not module_name or (sep and not attribute):
        raise KQueueError(f"app {path!r} is not of the form module or module:name")
    module = _module(module_name, "app")
    if attribute:
        target = _attribute(module, attribute, path, "app")
        if not isinstance(target, App):
            raise KQueueError(f"app {path!r} is a {type(target).__name__}, not a kqueue.App")
        return target
    apps = {name: value for name, value in vars(module).items() if isinstance(value, App)}
    if len(apps) != 1:
        found = f"{len(apps)} of them ({', '.join(sorted(apps))})" if apps else "none"
        raise KQueueError(
            f"app module {module_name!r} should hold one kqueue.App, and holds {found}: name it ({path}:NAME)"
        )
    return next(iter(apps.values()))


def _module(name: str, what: str) -> object:
    if os.getcwd() not in sys.path:  # as with `python -m`, the user's own modules in the current folder import
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise KQueueError(f"{what} module {name!r} does not import: {_where_it_failed(exc)}") from None


def _attribute(target: object, attribute: str, path: str, what: str) -> object:
    module_name = path.partition(":")[0]
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise KQueueError(f"{what} {path!r}: module {module_name!r} has no {attribute!r}") from None
    return target


def _where_it_failed(exc: BaseException) -> str:
    """``KeyError: 'missing' (at app/tasks.py, line 3)``: the error and the user's line that raised it."""
    # The user's frames: not kqueue's, nor the import machinery's (a module that is not there fails inside it)
    machinery = ("<frozen", os.path.dirname(importlib.__file__), os.path.dirname(__file__))
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith(machinery)]
    where = f" (at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" (at {exc.filename}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}{where}"
