"""The dashboard's HTTP server: the static page and a JSON API over run folders.

Every API request carries the random per-process token (header X-Tunesmith-Token) printed in the
address `tunesmith ui` shows, on 127.0.0.1 too: a web page the user visits could otherwise reach
the API. Requests a browser makes for another site's page (Origin not this server's,
Sec-Fetch-Site cross-site or same-site: another port of 127.0.0.1 is the same site) are refused,
POST bodies must be exactly application/json (a cross-site page can send `text/plain;
x=application/json` without a CORS preflight), and settings that run code are refused unless
`tunesmith ui --allow-code`. No path outside the runs folder is ever read or written.

Why the standard library's http.server and not Starlette on uvicorn: the dashboard serves one
user on one machine, a handful of routes, and runs training in child processes; what the issue
found was our own parsing, which is now exact (one Content-Length of digits only, no
Transfer-Encoding, no repeated Host/Origin/token header, a socket timeout, files streamed),
while a second server stack would add two dependencies and an event loop to every install for
no defence these checks do not give.
"""
from __future__ import annotations

import hmac
import json
import mimetypes
import os
import re
import secrets
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..errors import UserError
from . import folders, launch
from .wire import finite, is_address, is_loopback, json_object, media_type, own_names

STATIC = {"": "index.html", "index.html": "index.html", "app.js": "app.js", "style.css": "style.css"}
TOKEN_HEADER = "X-Tunesmith-Token"
MAX_BODY = 1 << 20
CHUNK = 1 << 16  # files are sent in pieces of this size, never read whole
# One thread serves each connection: past this many at once a new one is closed unanswered, so idle or
# trickling connections cannot take every thread and file handle of the process (1024 on many systems).
MAX_CONNECTIONS = 512
# A request's line, headers and body must all arrive within this from its first byte (a read timeout
# alone let a client that sends one header line a minute hold its connection for ever).
REQUEST_SECONDS = 30
IDLE_SECONDS = 15  # a connection waiting for its (next) request, or for any one read, is closed after this
SINGLE_HEADERS = ("Host", "Origin", "Content-Length", "Content-Type", TOKEN_HEADER, "Sec-Fetch-Site")
SAME_SITE_FETCHES = ("same-origin", "none")  # "none": the user typed or bookmarked the address
# The page, and every response: nothing is framed by another site, no address (with its token) leaves in a Referer.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
# A run's files (the report holds generated text) open sandboxed: no script runs with this origin's rights.
FILE_HEADERS = {"Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
                "Referrer-Policy": "no-referrer"}


class Refused(Exception):
    """A request answered with an HTTP error status before it reaches the API."""

    def __init__(self, code: HTTPStatus, message: str):
        super().__init__(message)
        self.code = code


class Dashboard(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, runs_dir: Path, host: str, port: int, token: str, allow_code: bool = False,
                 allow_hosts: list[str] | None = None):
        super().__init__((host, port), Handler)
        self.runs_dir = Path(runs_dir).absolute()
        self.token = token
        self.allow_code = allow_code
        self.loopback = is_loopback(host)
        # names answered besides IP addresses (bound to loopback: loopback names only, see _host_ok)
        self.names = set() if self.loopback else own_names(host) | {n.lower() for n in allow_hosts or []}
        self.children: list = []  # runs started here, reaped so none lingers as a zombie
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.holding: set = set()  # the connections holding a slot

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        with self.lock:
            self.holding.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            # SIGTERM (Terminated) may come while Thread.start waits for a thread already running: the
            # slot is given back once, here or by that thread (released twice, the ValueError hid the
            # Terminated from serve_forever, and the server ran on)
            self.give_back(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.give_back(request)

    def give_back(self, request) -> None:
        with self.lock:
            if request in self.holding:
                self.holding.remove(request)
                self.slots.release()

    @property
    def url(self) -> str:
        """The address to open: the page takes the token from it, then drops it from the address bar."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/?token={quote(self.token, safe='')}"

    def adopt(self, child) -> None:
        with self.lock:
            self.children = [c for c in self.children if c.poll() is None] + [child]

    def file_link(self, run: str, relative: str) -> str:
        """The address of one file of a run that opens without the token (a new tab cannot send a
        header): signed for that file alone, so the token never appears in an address."""
        return f"/api/runs/{quote(run, safe='')}/files/{quote(relative)}?sig={self.signature(run, relative)}"

    def signature(self, run: str, relative: str) -> str:
        return hmac.new(self.token.encode(), f"files\0{run}\0{relative}".encode(), "sha256").hexdigest()


def make_server(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None, allow_code: bool = False, allow_hosts: list[str] | None = None) -> Dashboard:
    """A dashboard server (not yet serving). Every API request needs the token; a random one is made
    when none is given, and an empty one (which would turn authentication off) is refused."""
    if token is None:  # a token of one's own without --token, which every user of the machine sees in `ps`
        token = os.environ.get(launch.TOKEN_VARIABLE)
    if token is None:
        token = secrets.token_urlsafe(24)
    elif not token.strip():
        raise UserError("--token: an empty token would let any program or web page use the dashboard; "
                        "give a non-empty one, or leave --token out for a random one")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is 0 to 65535 (0: any free one)")
    try:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--runs {runs_dir}: cannot be the runs folder ({err.strerror})") from None
    try:
        return Dashboard(Path(runs_dir), host, port, token, allow_code, allow_hosts)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host") from None


def serve(runs_dir: str | Path = "runs", host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
          allow_code: bool = False, allow_hosts: list[str] | None = None) -> None:
    """Serve the dashboard until interrupted; prints the address to open (it carries the token)."""
    server = make_server(runs_dir, host, port, token, allow_code, allow_hosts)
    print(f"tunesmith dashboard on {server.url}  (runs folder: {server.runs_dir})", flush=True)
    print(f"token: {server.token}  (required on every API request, as the {TOKEN_HEADER} header; "
          "the address above hands it to the page)", flush=True)
    if allow_code:
        print("--allow-code: runs started here may set model.trust_remote_code, eval.scorer and train.rewards", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Dashboard
    protocol_version = "HTTP/1.1"
    timeout = IDLE_SECONDS

    def handle_one_request(self):
        self._dropped = False
        try:
            if not self.rfile.peek(1):  # the (next) request's first byte; the deadline runs from it
                self.close_connection = True
                return
        except OSError:  # idle past IDLE_SECONDS, or gone
            self.close_connection = True
            return
        self._deadline = threading.Timer(REQUEST_SECONDS, self._drop)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle_one_request()
        except OSError:  # the client left, or was dropped: nothing to answer
            self.close_connection = True
        finally:
            self._deadline.cancel()

    def _drop(self) -> None:
        """The request did not arrive in time: end the connection (its blocked read returns, and what
        was read of the request is never acted on: _dispatch checks `_dropped`)."""
        self._dropped = True
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format, *args):  # quiet: the page polls every second, and nothing with a token is logged
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if self._dropped:  # the headers' reading was cut by the deadline: not a request to answer
            return
        try:
            length = self._checked_headers(method)
            if method == "GET" and (len(parts) == 1 or parts[:1] == ["static"]) and parts[-1] in STATIC:
                return self._send_static(STATIC[parts[-1]])  # the page holds no data: no token needed
            if parts[:1] != ["api"]:
                raise Refused(HTTPStatus.NOT_FOUND, "not found")
            self._refuse_other_sites()
            if not (self._token_ok() or self._signed_file(method, parts, url.query)):
                raise Refused(HTTPStatus.UNAUTHORIZED, "missing or wrong token: open the address `tunesmith ui` printed")
            if method == "POST" and media_type(self.headers.get("Content-Type")) != "application/json":
                raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "POST bodies must be application/json")
            body = self.rfile.read(length) if length else b""  # whole, before anything is done: the next
            self._deadline.cancel()  # request starts after it, and the deadline covers the reading only
            if self._dropped:  # the deadline fired as the body arrived: nothing is done on a dead connection
                return
            if len(body) < length:
                raise Refused(HTTPStatus.BAD_REQUEST, "request body cut short")
            self._route(method, parts[1:], body)
        except Refused as err:
            self.close_connection = True  # a body left unread must not be taken for the next request
            self._send_json({"error": str(err)}, err.code)
        except UserError as err:
            self._send_json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except LookupError as err:
            self._send_json({"error": str(err.args[0] if err.args else err)}, HTTPStatus.NOT_FOUND)
        except (BrokenPipeError, ConnectionResetError):  # the client left while answered: no one to tell
            self.close_connection = True
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._send_json({"error": f"{type(err).__name__}: {err}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, method: str, parts: list[str], body: bytes) -> None:
        runs_dir, allow_code = self.server.runs_dir, self.server.allow_code
        if parts == ["runs"] and method == "GET":
            return self._send_json({"runs": folders.list_runs(runs_dir)})
        if parts == ["runs"] and method == "POST":
            name, child = launch.start(json_object(body), runs_dir, allow_code)
            self.server.adopt(child)
            return self._send_json({"name": name, "pid": child.pid}, HTTPStatus.CREATED)
        if parts == ["preview"] and method == "POST":
            return self._send_json(launch.preview(json_object(body), runs_dir, allow_code))
        if len(parts) < 2 or parts[0] != "runs":
            raise LookupError("no such API path")
        folder = folders.run_folder(runs_dir, parts[1])
        action = parts[2:]
        if method == "GET" and not action:
            detail = folders.detail(folder)
            detail["links"] = {name: self.server.file_link(folder.name, name) for name in detail["reports"]}
            return self._send_json(detail)
        if method == "GET" and action == ["metrics"]:
            return self._send_json({"records": folders.read_metrics(folder), "status": folders.status(folder)})
        if method == "GET" and action[:1] == ["files"] and len(action) > 1:
            return self._send_file(folders.inside(folder, "/".join(action[1:])))
        if method == "POST" and action == ["stop"]:
            return self._send_json({"stopped": launch.stop(folder)})
        if method == "POST" and action in (["resume"], ["finish"]):  # finish: end a stopped run at its checkpoint
            child = (launch.resume if action == ["resume"] else launch.finish)(folder, allow_code)
            self.server.adopt(child)
            return self._send_json({"pid": child.pid})
        raise LookupError("no such API path")

    def _checked_headers(self, method: str) -> int:
        """The body's length, after the framing headers are checked exactly (http.server leaves
        them to us): one Content-Length of digits, no Transfer-Encoding, no repeated header that
        a decision is made on, Host a local name when serving on localhost, an address or the machine's
        own name otherwise (no DNS rebinding)."""
        for name in SINGLE_HEADERS:
            if len(self.headers.get_all(name) or []) > 1:
                raise Refused(HTTPStatus.BAD_REQUEST, f"more than one {name} header")
        if self.headers.get("Transfer-Encoding") is not None:
            raise Refused(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported; send a Content-Length")
        text = (self.headers.get("Content-Length") or "0").strip()
        if not re.fullmatch(r"[0-9]{1,12}", text):
            raise Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {text[:20]!r}: not a length")
        length = int(text)
        if length > MAX_BODY:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        if length and method != "POST":
            raise Refused(HTTPStatus.BAD_REQUEST, f"a {method} request has no body")
        if not self._host_ok(self._host_name()):
            raise Refused(HTTPStatus.FORBIDDEN, "unexpected Host header: open the dashboard by this machine's "
                                                "IP address or its own name (or start it with --allow-host NAME)")
        return length

    def _host_ok(self, name: str) -> bool:
        if self.server.loopback:
            return is_loopback(name)
        return is_address(name) or name in self.server.names

    def _host_name(self) -> str:
        """The name of the Host header without its port; '' where it is not `name[:port]` or `[v6][:port]`."""
        host = (self.headers.get("Host") or "").strip().lower()
        found = re.fullmatch(r"\[([0-9a-f:.]+)\](?::[0-9]{1,5})?|([^:\[\]]+)(?::[0-9]{1,5})?", host)
        return (found.group(1) or found.group(2)) if found else ""

    def _refuse_other_sites(self) -> None:
        """A browser says which page asked: only this server's own page (or the user, typing an
        address) may use the API. Clients that are not browsers send neither header."""
        site = (self.headers.get("Sec-Fetch-Site") or "").strip().lower()
        if site and site not in SAME_SITE_FETCHES:
            raise Refused(HTTPStatus.FORBIDDEN, f"refused a {site} request: only the dashboard's own page may use the API")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != f"http://{(self.headers.get('Host') or '').strip().lower()}":
            raise Refused(HTTPStatus.FORBIDDEN, "refused a request from another origin")

    def _token_ok(self) -> bool:
        given = self.headers.get(TOKEN_HEADER) or ""
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _signed_file(self, method: str, parts: list[str], query: str) -> bool:
        """A GET of /api/runs/RUN/files/PATH with the signature of that file (Dashboard.file_link)."""
        if method != "GET" or len(parts) < 5 or parts[1:2] != ["runs"] or parts[3] != "files":
            return False
        given = parse_qs(query).get("sig", [""])[0]
        return hmac.compare_digest(given.encode(), self.server.signature(parts[2], "/".join(parts[4:])).encode())

    def _start(self, content_type: str, length: int, code=HTTPStatus.OK, extra: dict | None = None) -> None:
        self._deadline.cancel()  # answering: however long a file takes to send, the request arrived
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (extra or PAGE_HEADERS).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, payload: bytes, content_type: str, code=HTTPStatus.OK) -> None:
        self._start(content_type, len(payload), code)
        self.wfile.write(payload)

    def _send_json(self, value, code=HTTPStatus.OK) -> None:
        self._send(json.dumps(finite(value), default=str).encode(), "application/json", code)

    def _send_static(self, name: str) -> None:
        payload = (resources.files("tunesmith.ui") / "static" / name).read_bytes()
        self._send(payload, mimetypes.guess_type(name)[0] or "application/octet-stream")

    def _send_file(self, path: Path) -> None:
        """The file in pieces, never whole in memory; as long as it was when opened (a log may grow meanwhile)."""
        if not path.is_file():
            raise LookupError(f"no file {path.name!r} in this run")
        with open(path, "rb") as handle:
            left = os.fstat(handle.fileno()).st_size
            self._start(mimetypes.guess_type(path.name)[0] or "application/octet-stream", left, extra=FILE_HEADERS)
            while left:
                piece = handle.read(min(CHUNK, left))
                if not piece:  # it shrank: the response is cut short, so the connection must end with it
                    self.close_connection = True
                    return
                self.wfile.write(piece)
                left -= len(piece)
