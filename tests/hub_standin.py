"""A local stand-in for the Hugging Face Hub: a stdlib HTTP server on 127.0.0.1 that answers the
requests huggingface_hub 2.4.0 sends for create_repo, create_branch and upload_folder (read from its
hf_api.py and _commit_api.py), and keeps the files it receives.

    POST /api/repos/create                          {name, organization, visibility?} -> {url}; 409 if it exists
    POST /api/validate-yaml                         {content, repoType} -> {} (400 when the front matter is not YAML)
    POST /api/models/NS/NAME/branch/BRANCH          a branch from main; 409 if it exists
    POST /api/models/NS/NAME/preupload/REV          {files: [{path, sample, size}]} -> every file "regular"
    POST /api/models/NS/NAME/commit/REV             NDJSON: a header line, then {key: file, value: {path,
                                                    content (base64), encoding}} lines -> {commitUrl, commitOid}
    GET  /api/models/NS/NAME                        repo info (create_repo asks it after a 401/403)

Every request must carry `Authorization: Bearer <token>`, else 401 (or `refuse` answers every request
with that status). Files go up as regular (base64) files: the LFS / Xet upload the real Hub asks for
large files is not part of this stand-in.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


class StandInHub:
    def __init__(self, token: str, refuse: int | None = None):
        self.token, self.refuse = token, refuse
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo id -> branch -> path -> bytes
        self.private: dict[str, bool] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandInHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id][branch]

    # The API: (status, JSON answer) for a request already known to be authorised.
    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
        self.repos[repo_id] = {"main": {}}
        self.private[repo_id] = body.get("visibility") == "private"
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, body: dict) -> tuple[int, dict]:
        content = body["content"]
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as err:
                return 400, {"errors": [{"message": f"front matter is not YAML: {err}"}]}
        return 200, {}

    def repo_call(self, method: str, repo_id: str, action: str, rev: str, raw: bytes) -> tuple[int, dict]:
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if method == "GET" and not action:
            return 200, {"id": repo_id, "private": self.private[repo_id], "sha": "0" * 40}
        if action == "branch":
            if rev in repo:
                return 409, {"error": "Reference already exists"}
            repo[rev] = dict(repo["main"])
            return 200, {}
        if rev not in repo:
            return 404, {"error": f"Invalid rev id: {rev}"}
        if action == "preupload":
            files = json.loads(raw)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        if action == "commit":
            lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            if not lines or lines[0]["key"] != "header":
                return 400, {"error": "the first line must be the commit header"}
            for line in lines[1:]:
                if line["key"] != "file" or line["value"].get("encoding") != "base64":
                    return 400, {"error": f"this stand-in takes base64 files only, not {line['key']}"}
                repo[rev][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            oid = hashlib.sha1(raw).hexdigest()
            return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"no such route: {action}"}


def handler_for(hub: StandInHub):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.answer("GET")

        def do_POST(self):
            self.answer("POST")

        def answer(self, method: str) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlsplit(self.path).path
            auth = self.headers.get("Authorization")
            hub.requests.append((method, path, auth))
            if hub.refuse or auth != f"Bearer {hub.token}":
                code = hub.refuse or 401
                return self.send(code, {"error": "Invalid credentials in Authorization header" if code == 401
                                        else "You don't have the rights to create a model under this namespace"})
            if (method, path) == ("POST", "/api/repos/create"):
                return self.send(*hub.create_repo(json.loads(raw)))
            if (method, path) == ("POST", "/api/validate-yaml"):
                return self.send(*hub.validate_yaml(json.loads(raw)))
            parts = [unquote(p) for p in path.split("/")]  # '', api, models, NS, NAME[, action, rev]
            if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
                action, rev = (parts[5], "/".join(parts[6:])) if len(parts) > 6 else ("", "")
                return self.send(*hub.repo_call(method, f"{parts[3]}/{parts[4]}", action, rev, raw))
            self.send(404, {"error": f"no such route: {method} {path}"})

        def send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # quiet: the test output is pytest's
            pass

    return Handler
