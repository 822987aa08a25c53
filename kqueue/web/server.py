"""The page's HTTP side: routes, templates, and what keeps it safe.

- The page is server-rendered (Jinja2, autoescaped: a task's text is shown as
  text) and htmx refreshes its parts every `REFRESH` seconds.
- Every action is a POST carrying the page's CSRF token in a header, from a
  page of this very origin; a page of another site can neither send that
  header nor read the token.
- Bound to a loopback address, it answers only requests naming a loopback
  host (no DNS rebinding). With a token, every request must carry it: once as
  ``?token=``, which becomes a cookie, or as ``Authorization: Bearer``.
- The broker is the one the server was started with: no request names another.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from kqueue import __version__
from kqueue.cli.common import plural
from kqueue.errors import KQueueError
from kqueue.web import is_loopback
from kqueue.web.board import REFRESH, Board, describe_rate, sparkline

__all__ = ["create_app"]

HERE = Path(__file__).parent
#: Characters of a task shown in the list; the whole text is a click away, up to `WHOLE_SHOWN`.
SHORT = 120
WHOLE_SHOWN = 65536
COOKIE = "kqueue_web_token"
CSRF_HEADER = "x-kqueue-csrf"


def create_app(board: Board, *, token: str | None = None, loopback: bool = True) -> Starlette:
    """The page for `board`: with a `token`, every request must carry it; `loopback` limits the Host header."""
    csrf = secrets.token_urlsafe(24)
    # Autoescaped, always: a task's text is text, whatever it holds.
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True)
    templates = Jinja2Templates(env=env)
    templates.env.filters.update(rate=describe_rate, n=_count, utc=_utc, short=_short, whole=_whole, plural=plural)
    templates.env.globals.update(
        csrf=csrf, broker=board.shown_url, version=__version__, refresh=REFRESH, sparkline=sparkline
    )

    async def page(request: Request) -> Response:
        reading = await run_in_threadpool(board.read)
        return _render(templates, request, "page.html", {"reading": reading})

    async def queues_part(request: Request) -> Response:
        if (refused := _refused(request, csrf)) is not None:
            return refused
        reading = await run_in_threadpool(board.read)
        return _render(templates, request, "queues.html", {"reading": reading})

    async def dead_part(request: Request) -> Response:
        # Reading the dead letters fetches them and gives them back: no other site may make the page do it.
        if (refused := _refused(request, csrf)) is not None:
            return refused
        name = request.query_params.get("queue", "")
        if name not in board.queue_names():
            return PlainTextResponse(f"no queue {name!r} on this page", status_code=404)
        error: str | None = None
        try:
            letters, count = await run_in_threadpool(board.letters, name)
        except KQueueError as exc:
            letters, count, error = [], None, str(exc)
        shown = error if error is not None else f"{count} {' '.join(letter.key for letter in letters)}"
        seen = hashlib.sha256(shown.encode()).hexdigest()[:16]
        if request.query_params.get("seen") == seen:
            return Response(status_code=204)  # unchanged: htmx leaves the list, and any text opened in it, as it is
        context = {"name": name, "letters": letters, "count": count, "error": error, "seen": seen}
        return _render(templates, request, "dead.html", context)

    async def act(request: Request) -> Response:
        if (refused := _refused(request, csrf)) is not None:
            return refused
        form = {key: values[0] for key, values in parse_qs((await request.body()).decode()).items()}
        action, name, key = request.path_params["action"], form.get("queue", ""), form.get("letter")
        try:
            said = await run_in_threadpool(_do, board, action, name, key)
        except KQueueError as exc:
            return _said(request, templates, str(exc), failed=True)
        return _said(request, templates, said)

    routes = [
        Route("/", page),
        Route("/parts/queues", queues_part),
        Route("/parts/dead", dead_part),
        Route("/actions/{action}", act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_Guard, token=token, loopback=loopback)])
    return app


def _do(board: Board, action: str, name: str, key: str | None) -> str:
    """Do `action` on queue `name`, and say what was done."""
    if action == "replay" and key:
        moved = board.replay(name, key)
        return f"moved {plural(moved, 'dead letter')} back to {name}" if moved else "that dead letter is gone already"
    if action == "replay-all":
        return f"moved {plural(board.replay(name), 'dead letter')} back to {name}"
    if action == "delete" and key:
        gone = board.delete(name, key)
        return f"deleted 1 dead letter of {name}" if gone else "that dead letter is gone already"
    if action in ("purge", "purge-dead"):
        target = f"{name}.dead" if action == "purge-dead" else name
        return f"purged {plural(board.purge(name, dead=action == 'purge-dead'), 'message')} from {target}"
    raise KQueueError(f"no action {action!r}")


def _said(request: Request, templates: Jinja2Templates, text: str, *, failed: bool = False) -> Response:
    response = _render(templates, request, "said.html", {"text": text, "failed": failed})
    response.headers["HX-Trigger"] = "kqueue-changed"  # the parts refresh at once
    return response


def _render(templates: Jinja2Templates, request: Request, name: str, context: dict[str, Any]) -> Response:
    response: Response = templates.TemplateResponse(request, name, context)
    return response


def _refused(request: Request, csrf: str) -> Response | None:
    """Why a request the page's script makes is refused (None: it is not): another origin's, or without its token."""
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        return PlainTextResponse("refused: a request from another site", status_code=403)
    if not _same(request.headers.get(CSRF_HEADER, ""), csrf):
        return PlainTextResponse("refused: no CSRF token; use the page's buttons", status_code=403)
    return None


class _Guard:
    """Headers that keep the page to itself, and the token where there is one."""

    def __init__(self, app: ASGIApp, token: str | None, loopback: bool) -> None:
        self.app = app
        self.token = token
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.loopback and not is_loopback(_host_name(request.headers.get("host", ""))):
            # DNS rebinding: another site's name, pointed at this machine.
            await PlainTextResponse("refused: this page answers to loopback names only", status_code=400)(
                scope, receive, send
            )
            return
        if self.token is not None:
            given = request.query_params.get("token")
            if given is not None and _same(given, self.token):
                # Into a cookie, and out of the address bar and the history.
                response: Response = RedirectResponse(request.url.remove_query_params("token"), status_code=303)
                response.set_cookie(_cookie(request), self.token, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
            if not self._carries_token(request):
                response = PlainTextResponse(
                    "kqueue web: this page needs its token: open it as /?token=... "
                    "(the one given with --token or KQUEUE_WEB_TOKEN)",
                    status_code=401,
                )
                await response(scope, receive, send)
                return

        async def send_guarded(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", _CSP),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_guarded)

    def _carries_token(self, request: Request) -> bool:
        assert self.token is not None
        bearer = request.headers.get("authorization", "")
        given = bearer[len("Bearer ") :] if bearer.startswith("Bearer ") else request.cookies.get(_cookie(request), "")
        return _same(given, self.token)


def _cookie(request: Request) -> str:
    """The token's cookie, named after the port: browsers share cookies between the ports of one host."""
    return f"{COOKIE}_{request.url.port or 80}"


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8181`` is ``::1``."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same(given: str, secret: str) -> bool:
    """Whether `given` is `secret`, in a time that does not tell how much of it matched."""
    return hmac.compare_digest(given.encode(), secret.encode())


_CSP = b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _utc(at: float | None) -> str:
    """When, in UTC; a time rather than an age, which a list kept as it is would leave stale."""
    return "?" if at is None else datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(text: str) -> str:
    return text if len(text) <= SHORT else f"{text[:SHORT]}…"


def _whole(text: str) -> str:
    if len(text) <= WHOLE_SHOWN:
        return text
    return f"{text[:WHOLE_SHOWN]}… ({len(text):,} characters; kqueue dead list shows them all)"
