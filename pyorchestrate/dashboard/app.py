"""The dashboard's web app (Starlette): the page, its JSON API, a server-sent event stream, and
``/metrics``.  Every route needs the token (printed at start): as ``?token=`` once (it becomes a
cookie), a cookie, or ``Authorization: Bearer``; actions also need it in ``X-Token`` (a page on
another site can make a browser send the cookie, never the header)."""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..client import ControlError
from . import metrics
from .feed import Feed

COOKIE = "pyorchestrate_token"
_PAGE = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")
_LOGIN = """<!doctype html><meta charset="utf-8"><title>pyorchestrate — sign in</title>
<body style="font-family:sans-serif;margin:3em"><h1>pyorchestrate dashboard</h1>
<p>Paste the token the dashboard printed when it started (or open the URL it printed).</p>
<form method="post" action="login"><input name="token" type="password" size="50" autofocus>
<button>Sign in</button></form>{error}</body>"""
ACTIONS = {"agents": ("start", "stop", "restart"), "workers": ("drain",)}


def _whole(text: str) -> int | None:
    """A query parameter as a whole number >= 0, or None (it was a 500 error: a user's typo)."""
    return int(text) if text.isdecimal() else None  # (isdigit() passes "²", which int() refuses)


def _bad(what: str) -> JSONResponse:
    return JSONResponse({"error": what}, status_code=400)


def create_app(feed: Feed, token: str, stream_interval: float = 0.5) -> Starlette:
    reg = metrics.registry(feed)

    def authed(request: Request) -> bool:
        given = request.cookies.get(COOKIE) or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), token.encode())

    def refuse() -> JSONResponse:
        return JSONResponse({"error": "sign in: the token the dashboard printed at start is needed"}, status_code=401)

    async def page(request: Request) -> Response:
        if request.query_params.get("token"):
            if not authed(request):
                return HTMLResponse(_LOGIN.format(error="<p>That token is not this dashboard's.</p>"), 401)
            response = RedirectResponse(request.url.path, status_code=303)  # the token leaves the URL
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        if not authed(request):
            return HTMLResponse(_LOGIN.format(error=""), 401)
        return HTMLResponse(_PAGE.replace("__TOKEN__", token))

    async def login(request: Request) -> Response:
        form = await request.form()
        given = str(form.get("token", ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HTMLResponse(_LOGIN.format(error="<p>That token is not this dashboard's.</p>"), 401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def state(request: Request) -> Response:
        return JSONResponse(feed.state()) if authed(request) else refuse()

    async def events(request: Request) -> Response:
        if not authed(request):
            return refuse()
        after = _whole(request.query_params.get("after") or "0")
        if after is None:
            return _bad("after= must be a whole number (the n of the last event seen)")
        return JSONResponse(feed.events_after(after))

    async def history(request: Request) -> Response:
        if not authed(request):
            return refuse()
        q = request.query_params
        limit = _whole(q.get("limit") or "200")
        if limit is None:
            return _bad("limit= must be a whole number")
        try:
            rows = await asyncio.to_thread(feed.act_query, "history", agent=q.get("agent") or None, limit=limit)
        except (ControlError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=502)
        return JSONResponse(rows)

    async def stream(request: Request) -> Response:
        """Server-sent events: ``state`` every ``stream_interval`` s, and each bus event once."""
        if not authed(request):
            return refuse()
        after = _whole(request.headers.get("last-event-id") or request.query_params.get("after") or "0")
        if after is None:
            return _bad("after= (or Last-Event-ID) must be a whole number (the n of the last event seen)")

        async def produce():
            nonlocal after
            last_state = None
            while not await request.is_disconnected():
                for ev in feed.events_after(after):
                    after = ev["n"]
                    yield f"id: {ev['n']}\nevent: bus\ndata: {json.dumps(ev, default=str)}\n\n"
                current = json.dumps(feed.state(), default=str)
                if current != last_state:
                    last_state = current
                    yield f"event: state\ndata: {current}\n\n"
                await asyncio.sleep(stream_interval)

        return StreamingResponse(produce(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def act(request: Request) -> Response:
        kind, name, op = (request.path_params[k] for k in ("kind", "name", "op"))
        if not authed(request):
            return refuse()
        if not hmac.compare_digest(request.headers.get("x-token", "").encode(), token.encode()):
            return JSONResponse({"error": "actions need the X-Token header"}, status_code=403)
        if op not in ACTIONS.get(kind, ()):
            return JSONResponse({"error": f"no action {op!r} on {kind}"}, status_code=404)
        if not feed.can_act:
            return JSONResponse({"error": "this dashboard holds a reader key: actions need an admin key "
                                          "(start it with --keys DIR holding one)"}, status_code=403)
        try:
            result = await asyncio.to_thread(feed.act, op, **({"worker": name} if kind == "workers" else {"agent": name}))
        except ControlError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        return JSONResponse(result)

    async def scrape(request: Request) -> Response:
        if not authed(request):
            return Response("token needed (Authorization: Bearer TOKEN)\n", status_code=401)
        return Response(metrics.render(reg), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(routes=[
        Route("/", page), Route("/login", login, methods=["POST"]),
        Route("/api/state", state), Route("/api/events", events), Route("/api/history", history),
        Route("/api/stream", stream), Route("/api/{kind}/{name}/{op}", act, methods=["POST"]),
        Route("/metrics", scrape),
    ])
