"""What the web server lets through before Gradio sees a request (an ASGI middleware; no gradio import).

Checked on every request (``RequestGuard``):

* **Host** (only while the server listens on a loopback address, the default): the ``Host`` header must
  name ``localhost``, ``127.0.0.1`` or ``[::1]``, or a name given by ``--allow-host`` (any port). A web
  page cannot then reach the server by a name of its own that resolves to this machine (DNS rebinding).
  ``--host ADDRESS`` exposes the server on purpose and lifts this check; ``--allow-host NAME`` keeps it
  bound to loopback behind a reverse proxy that passes the browser's Host on.
* **Origin** (always): a request that carries an ``Origin`` header must come from the server's own page:
  ``Origin`` is ``http://`` or ``https://`` followed by the request's own ``Host``. Browsers send
  ``Origin`` with every POST, so another web page the user visits cannot post uploads or generations
  blind; clients that send no ``Origin`` (curl, Python) pass.
* **Session**: the first response gives the browser a random cookie (``SESSION_COOKIE``: HttpOnly,
  SameSite=Lax); a session is one browser (all its tabs). An upload (``POST …/upload``) without that
  cookie is refused.
* **Uploads**: per session, at most ``Limits.max_session_uploads`` files and
  ``Limits.max_session_upload_bytes`` bytes per ``window_s`` (an hour: Gradio keeps uploads that long),
  and ``Limits.max_server_upload_bytes`` for all sessions together; the bytes are the request's
  ``Content-Length`` (required), checked before Gradio reads the body; the painted layers the region
  editor sends ahead of its event (``POST …/component_server``) count against the same bytes.
* **Files**: ``…/file=PATH`` of an uploaded photo is served only to the sessions that uploaded it (the
  same file uploaded by two sessions belongs to both); to any other client it answers as Gradio does
  for a file it does not serve (403 ``File not allowed``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from mipadapter.limits import Limits

SESSION_COOKIE = "mipadapter-session"
UPLOAD_WINDOW_S = 3600
"""Uploads count against a session for this long (Gradio deletes uploads older than an hour)."""
_SESSION_FORMAT = re.compile(r"[A-Za-z0-9_-]{32}")
_FILE_ROUTE = re.compile(r"/file(?:=|/)(.+)$")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    """``localhost:7860`` → ``localhost``; ``[::1]:7860`` → ``::1``."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


def _resolved(path: str | os.PathLike) -> str:
    """A path as Gradio's file route resolves it."""
    return str(Path(os.path.abspath(str(path))).resolve())


class UploadLedger:
    """Who uploaded what, and how much each session (and the server) took within the window."""

    def __init__(self, limits: Limits, window_s: float = UPLOAD_WINDOW_S) -> None:
        self.limits, self.window_s = limits, window_s
        self._lock = threading.Lock()
        self._sessions: dict[str, deque[tuple[float, int, int]]] = {}  # session → (time, files, bytes)
        self._owners: dict[str, set[str]] = {}  # resolved path → sessions that uploaded it

    def _recent(self, now: float) -> None:
        cutoff = now - self.window_s
        for session in list(self._sessions):
            entries = self._sessions[session]
            while entries and entries[0][0] < cutoff:
                entries.popleft()
            if not entries:
                del self._sessions[session]

    def refusal(self, session: str, nbytes: int, now: float | None = None) -> str | None:
        """Why a request of ``nbytes`` from ``session`` is refused, or None."""
        now = time.time() if now is None else now
        limits = self.limits
        with self._lock:
            self._recent(now)
            entries = self._sessions.get(session, ())
            files = sum(entry[1] for entry in entries)
            used = sum(entry[2] for entry in entries)
            everyone = sum(entry[2] for kept in self._sessions.values() for entry in kept)
        hours = "hour" if self.window_s == 3600 else f"{self.window_s:g} s"
        if files >= limits.max_session_uploads:
            return (
                f"upload refused: this session has uploaded {files} files in the last {hours}; the limit "
                f"is {limits.max_session_uploads}"
            )
        if used + nbytes > limits.max_session_upload_bytes:
            return (
                f"upload refused: {_mb(nbytes)} more would bring this session to {_mb(used + nbytes)} in the "
                f"last {hours}; the limit is {_mb(limits.max_session_upload_bytes)}"
            )
        if everyone + nbytes > limits.max_server_upload_bytes:
            return (
                f"upload refused: the server has taken {_mb(everyone)} of uploads in the last {hours}; the "
                f"limit is {_mb(limits.max_server_upload_bytes)}"
            )
        return None

    def record(
        self, session: str, nbytes: int, paths: Iterable[str | os.PathLike] = (), now: float | None = None
    ) -> None:
        """Count ``nbytes`` and the files at ``paths`` against ``session``, which now owns those files."""
        now = time.time() if now is None else now
        paths = [_resolved(path) for path in paths]
        with self._lock:
            self._sessions.setdefault(session, deque()).append((now, len(paths), int(nbytes)))
            for path in paths:
                self._owners.setdefault(path, set()).add(session)
            for path in [path for path in self._owners if not os.path.exists(path)]:  # Gradio deleted it
                del self._owners[path]

    def files_of(self, session: str) -> int:
        with self._lock:
            self._recent(time.time())
            return sum(entry[1] for entry in self._sessions.get(session, ()))

    def owners(self, path: str | os.PathLike) -> set[str] | None:
        """The sessions that uploaded the file at ``path``; None when it is not an upload."""
        with self._lock:
            owners = self._owners.get(_resolved(path))
            return None if owners is None else set(owners)


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def session_of(scope) -> str | None:
    """The request's session (its ``SESSION_COOKIE``), None when it has none of the right form.

    Parsed leniently (Starlette's parser): a browser sends every cookie of ``localhost``, whatever
    other local server set it, and one malformed cookie must not hide ours."""
    from starlette.requests import cookie_parser

    value = cookie_parser(_header(scope, b"cookie") or "").get(SESSION_COOKIE)
    return value if value is not None and _SESSION_FORMAT.fullmatch(value) else None


async def _respond(
    send, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware in front of the Gradio app: the checks of this module's docstring.

    exposed: the server listens on a non-loopback address on purpose (``--host``): the Host check is off.
    allowed_hosts: host names (no port) answered besides the loopback ones.
    """

    def __init__(
        self,
        app,
        *,
        limits: Limits,
        exposed: bool = False,
        allowed_hosts: Iterable[str] = (),
        ledger: UploadLedger | None = None,
    ) -> None:
        self.app, self.exposed = app, exposed
        self.allowed_hosts = {name.lower().strip("[]") for name in allowed_hosts}
        self.ledger = ledger or UploadLedger(limits)

    def refusal(self, scope) -> str | None:
        """Why a request is refused by its Host or Origin header, or None."""
        host = _header(scope, b"host")
        name = None if host is None else _hostname(host)
        if name is not None and not self.exposed and not is_loopback(name) and name not in self.allowed_hosts:
            return (
                f"refused: Host {host!r} is not a name of this server; it answers to localhost, 127.0.0.1 "
                "and [::1] (mipadapter web --allow-host NAME adds a name, --host ADDRESS exposes it)"
            )
        origin = _header(scope, b"origin")
        if origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or host is None or parts.netloc.lower() != host.lower():
                return (
                    f"refused: a request from the page at {origin!r}; this server takes requests only from "
                    f"its own page (http://{host})"
                )
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await _respond(send, 403, refused.encode())
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        session = session_of(scope)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method == "POST" and (path.endswith("/upload") or path.rstrip("/").endswith("/component_server")):
            await self._upload(scope, receive, send, session, files=path.endswith("/upload"))
            return
        served = _FILE_ROUTE.search(path) if method in ("GET", "HEAD") else None
        if served is not None:
            owners = self.ledger.owners(served.group(1))
            if owners is not None and session not in owners:
                body = json.dumps({"detail": f"File not allowed: {served.group(1)}."}).encode()
                await _respond(send, 403, body, b"application/json")
                return
        await self.app(scope, receive, self._with_session(send, session))

    def _with_session(self, send, session: str | None):
        """``send`` that gives a request without a session a new one (a cookie on its response)."""
        if session is not None:
            return send
        cookie = f"{SESSION_COOKIE}={secrets.token_urlsafe(24)}; Path=/; HttpOnly; SameSite=Lax".encode()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"set-cookie", cookie)]}
            await send(message)

        return sending

    async def _upload(self, scope, receive, send, session: str | None, files: bool) -> None:
        """An upload: refused without a session or a Content-Length or beyond the session's limits; else
        passed on, and the files Gradio reports having written are recorded as the session's."""
        if session is None:
            message = "upload refused: no session cookie (open the page first, then upload from it)"
            await _respond(send, 403, message.encode())
            return
        length = _header(scope, b"content-length")
        if length is None or not length.isdigit():
            await _respond(send, 411, b"upload refused: the request must give its Content-Length")
            return
        nbytes = int(length)
        refused = self.ledger.refusal(session, nbytes)
        if refused is not None:
            await _respond(send, 413, refused.encode())
            return
        if not files:
            self.ledger.record(session, nbytes)
            await self.app(scope, receive, send)
            return
        start, body = None, []

        async def keep(message) -> None:  # Gradio's answer (the list of written paths), held back
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        content = b"".join(body)
        written = []
        if start is not None and start["status"] == 200:
            try:
                written = [str(item) for item in json.loads(content)]
            except (ValueError, TypeError):
                written = []
        over = self.ledger.files_of(session) + len(written) - self.ledger.limits.max_session_uploads
        if written and over > 0:
            for path in written:  # a request with more files than the session has left: none kept
                if self.ledger.owners(path) is None:
                    Path(path).unlink(missing_ok=True)
            limit = self.ledger.limits.max_session_uploads
            message = (
                f"upload refused: {len(written)} files would bring this session above its {limit} files "
                "per hour"
            )
            await _respond(send, 413, message.encode())
            return
        self.ledger.record(session, nbytes, written)
        if start is None:
            await _respond(send, 500, b"upload failed")
            return
        headers = [
            (key, value) for key, value in start.get("headers", ()) if key.lower() != b"content-length"
        ]
        await send({**start, "headers": [*headers, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
