"""The dashboard's HTTP server (standard library only): the static page and a JSON API over run folders.

Bound to 127.0.0.1 unless told otherwise; bound beyond this machine, every API request must carry
the token printed at start. No path outside the runs folder is ever read or written.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import math
import mimetypes
import secrets
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UserError
from . import folders, launch

STATIC = {"": "index.html", "index.html": "index.html", "app.js": "app.js", "style.css": "style.css"}
TOKEN_HEADER = "X-Tunesmith-Token"
MAX_BODY = 1 << 20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def finite(value):
    """NaN and infinity (a skipped step's loss) become null: browsers' JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


class Dashboard(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, runs_dir: Path, host: str, port: int, token: str | None):
        super().__init__((host, port), Handler)
        self.runs_dir = Path(runs_dir).absolute()
        self.token = token
        self.loopback = is_loopback(host)
        self.children: list = []  # runs started here, reaped so none lingers as a zombie
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        query = f"/?token={self.token}" if self.token else "/"
        return f"http://{host}:{port}{query}"

    def adopt(self, child) -> None:
        with self.lock:
            self.children = [c for c in self.children if c.poll() is None] + [child]


def make_server(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None) -> Dashboard:
    """A dashboard server (not yet serving). Beyond localhost a token is required; one is made if none is given."""
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    try:
        return Dashboard(Path(runs_dir), host, port, token)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host") from None


def serve(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve the dashboard until interrupted; prints the address (with the token when one is needed)."""
    server = make_server(runs_dir, host, port, token)
    print(f"tunesmith dashboard on {server.url}  (runs folder: {server.runs_dir})", flush=True)
    if server.token:
        print(f"token: {server.token}  (required on every request; send it as {TOKEN_HEADER} or ?token=)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Dashboard
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the page polls every second
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            if not self._host_allowed():
                return self._send_json({"error": "unexpected Host header"}, HTTPStatus.FORBIDDEN)
            if method == "GET" and (len(parts) == 1 or parts[:1] == ["static"]) and parts[-1] in STATIC:
                return self._send_static(STATIC[parts[-1]])
            if parts[:1] != ["api"]:
                return self._send_json({"error": "not found"}, HTTPStatus.NOT_FOUND)
            if not self._token_ok(parse_qs(url.query).get("token", [None])[0]):
                return self._send_json({"error": "missing or wrong token"}, HTTPStatus.UNAUTHORIZED)
            if method == "POST" and "application/json" not in self.headers.get("Content-Type", ""):
                # A cross-site form cannot send JSON without a CORS preflight, which is never granted.
                return self._send_json({"error": "POST bodies must be application/json"}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
            self._route(method, parts[1:])
        except UserError as err:
            self._send_json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except LookupError as err:
            self._send_json({"error": str(err.args[0] if err.args else err)}, HTTPStatus.NOT_FOUND)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            self._send_json({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, method: str, parts: list[str]) -> None:
        runs_dir = self.server.runs_dir
        if parts == ["runs"] and method == "GET":
            return self._send_json({"runs": folders.list_runs(runs_dir)})
        if parts == ["runs"] and method == "POST":
            name, child = launch.start(self._body(), runs_dir)
            self.server.adopt(child)
            return self._send_json({"name": name, "pid": child.pid}, HTTPStatus.CREATED)
        if parts == ["preview"] and method == "POST":
            return self._send_json(launch.preview(self._body(), runs_dir))
        if len(parts) < 2 or parts[0] != "runs":
            raise LookupError("no such API path")
        folder = folders.run_folder(runs_dir, parts[1])
        action = parts[2:]
        if method == "GET" and not action:
            return self._send_json(folders.detail(folder))
        if method == "GET" and action == ["metrics"]:
            return self._send_json({"records": folders.read_metrics(folder), "status": folders.status(folder)})
        if method == "GET" and action[:1] == ["files"] and len(action) > 1:
            return self._send_file(folders.inside(folder, "/".join(action[1:])))
        if method == "POST" and action == ["stop"]:
            return self._send_json({"stopped": launch.stop(folder)})
        if method == "POST" and action == ["resume"]:
            child = launch.resume(folder)
            self.server.adopt(child)
            return self._send_json({"pid": child.pid})
        raise LookupError("no such API path")

    def _host_allowed(self) -> bool:
        # On localhost without a token, a foreign site could reach us by DNS rebinding: accept only local names.
        if not self.server.loopback or self.server.token:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return is_loopback(host)

    def _token_ok(self, from_query: str | None) -> bool:
        expected = self.server.token
        if not expected:
            return True
        given = self.headers.get(TOKEN_HEADER) or from_query or ""
        return hmac.compare_digest(given.encode(), expected.encode())

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise UserError("request body too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as err:
            raise UserError(f"request body: not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise UserError("request body: expected a JSON object")
        return body

    def _send(self, payload: bytes, content_type: str, code=HTTPStatus.OK) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, value, code=HTTPStatus.OK) -> None:
        self._send(json.dumps(finite(value), default=str).encode(), "application/json", code)

    def _send_static(self, name: str) -> None:
        payload = (resources.files("tunesmith.ui") / "static" / name).read_bytes()
        self._send(payload, mimetypes.guess_type(name)[0] or "application/octet-stream")

    def _send_file(self, path: Path) -> None:
        if not path.is_file():
            raise LookupError(f"no file {path.name!r} in this run")
        self._send(path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")
