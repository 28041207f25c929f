"""The labelling web app (FastAPI): one plain page for labellers, one for the admin, a small JSON API.

Who is who: a labeller's invite link carries their token in the URL fragment (never sent to a
server or written to a log); the page trades it once for an HttpOnly, SameSite=Strict cookie.
Everything a labeller does is as the labeller that cookie names: a vote has no "who" field. Votes
also need the CSRF token the page gets from /api/next, and a POST whose Origin is another site is
refused. Admin views (report, export, invites) need `Authorization: Bearer <admin key>`.
Completions are untrusted model output: the page only ever sets them as text, and the Content
Security Policy allows no inline script, so markup in a completion is shown, never run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from importlib import resources
from typing import Literal
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from kiln.serve.label.db import LabelDB, LabelDBError, Labeller, token_hash

COOKIE = "kiln_label"
COOKIE_AGE_S = 30 * 24 * 3600
MAX_TOKEN = 200  # longer "tokens" are refused before hashing
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {  # name -> media type; the only files served
    "index.html": "text/html; charset=utf-8",
    "admin.html": "text/html; charset=utf-8",
    "label.js": "text/javascript; charset=utf-8",
    "admin.js": "text/javascript; charset=utf-8",
    "label.css": "text/css; charset=utf-8",
}


class Session(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=MAX_TOKEN)


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no way to name another labeller
    pair_id: int
    choice: Literal["left", "right", "tie", "both_bad"]
    comment: str = Field("", max_length=4000)


class Invite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)


def make_app(db: LabelDB, *, admin_key: str, per_pair: int = 1, lease_s: float = 600.0, base_url: str = "",
             allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app over `db`. `allowed_hosts` (hostnames) guards a loopback server against DNS rebinding;
    `base_url` is where labellers open the page, for the invite links the admin view makes."""
    if not admin_key:
        raise ValueError("an admin key is required")
    app = FastAPI(title="kiln label", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    _add_guard(app, allowed_hosts)
    _add_pages(app)
    _add_labeller_api(app, db, per_pair, lease_s)
    _add_admin_api(app, db, admin_key, per_pair, base_url)
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal, the database's, a route's or a malformed request's, is `{"error": "<one line>"}`."""

    @app.exception_handler(LabelDBError)
    async def _db_error(request: Request, e: LabelDBError):
        return _error(e.status, str(e))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(422, f"bad request: {where or 'body'}: {first.get('msg', 'invalid')}")


def _add_guard(app: FastAPI, allowed_hosts: list[str] | None) -> None:
    """Before any route: refuse an unknown Host (DNS rebinding) and a cross-site write; after it:
    the security headers on every answer."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None and request.url.hostname not in allowed_hosts:
            return _error(400, f"unknown host {request.url.hostname!r}; open the address `kiln label serve` printed")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
                return _error(403, "cross-site request refused")
            if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return _error(403, "cross-site request refused")
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response


def _add_pages(app: FastAPI) -> None:
    """The labeller's page (/), the admin's (/admin) and their scripts and style (/static/NAME): only `STATIC`."""
    files = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC}

    def page(name: str) -> Response:
        return Response(files[name], media_type=STATIC[name])

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return page("index.html")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> Response:
        return page("admin.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC or name.endswith(".html"):
            raise HTTPException(404, "no such file")
        return page(name)


def _add_labeller_api(app: FastAPI, db: LabelDB, per_pair: int, lease_s: float) -> None:
    """The labeller's API: /api/session trades an invite token for the cookie; /api/next and /api/vote
    act as the labeller that cookie names, and a vote needs the CSRF token /api/next gave."""
    secret = bytes.fromhex(db.secret)

    def csrf_token(token: str) -> str:
        return hmac.new(secret, b"csrf:" + token_hash(token).encode(), hashlib.sha256).hexdigest()

    def labeller(request: Request) -> tuple[Labeller, str]:
        token = request.cookies.get(COOKIE, "")
        who = db.labeller(token) if 0 < len(token) <= MAX_TOKEN else None
        if who is None:
            raise HTTPException(401, "no valid labeller token: open your invite link "
                                     "(made by `kiln label invite name=...`)")
        return who, token

    @app.post("/api/session")
    def session(body: Session, response: Response) -> dict:
        who = db.labeller(body.token)
        if who is None:
            raise HTTPException(401, "this invite link is not valid (mistyped, or renewed since); "
                                     "ask for a new one (`kiln label invite name=...`)")
        response.set_cookie(COOKIE, body.token, max_age=COOKIE_AGE_S, httponly=True, samesite="strict", path="/")
        return {"name": who.name}

    @app.get("/api/next")
    def next_pair(me: tuple[Labeller, str] = Depends(labeller)) -> dict:
        who, token = me
        shown = db.next_pair(who, per_pair, lease_s)
        pair = None if shown is None else {
            "id": shown.pair_id, "prompt": shown.prompt, "left": shown.left, "right": shown.right}
        return {"name": who.name, "csrf": csrf_token(token), "pair": pair,
                "progress": db.progress(who, per_pair, lease_s)}

    @app.post("/api/vote")
    def vote(body: Vote, me: tuple[Labeller, str] = Depends(labeller),
             x_csrf_token: str = Header("")) -> dict:
        who, token = me
        if not hmac.compare_digest(x_csrf_token.encode(), csrf_token(token).encode()):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page")
        recorded = db.vote(who, body.pair_id, body.choice, body.comment)
        return {"recorded": recorded, "progress": db.progress(who, per_pair, lease_s)}


def _add_admin_api(app: FastAPI, db: LabelDB, admin_key: str, per_pair: int, base_url: str) -> None:
    """The admin's API (/api/admin/report, export, invite), each behind `Authorization: Bearer <admin key>`."""

    def admin(authorization: str = Header("")) -> None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), admin_key.encode()):
            raise HTTPException(401, "admin key required: send `Authorization: Bearer <admin key>` "
                                     "(printed by `kiln label serve`, or label.admin_key)")

    @app.get("/api/admin/report", dependencies=[Depends(admin)])
    def report() -> dict:
        return db.report(per_pair)

    @app.get("/api/admin/export", dependencies=[Depends(admin)])
    def export() -> Response:
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in db.preferences())
        return Response(body, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="preferences.jsonl"'})

    @app.post("/api/admin/invite", dependencies=[Depends(admin)])
    def invite(body: Invite) -> dict:
        token = db.invite(body.name)
        return {"name": body.name.strip(), "link": invite_link(base_url, token)}


def invite_link(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/#join={token}"
