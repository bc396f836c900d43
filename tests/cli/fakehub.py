"""A local HTTP server that answers like the Hugging Face Hub for what `selfext pull` asks (via HF_ENDPOINT).

Routes (huggingface_hub 2.x):
    GET  /api/models/{owner}/{repo}/tree/{revision}     list_repo_files: JSON list of {"type", "path", "size", "oid"}
    HEAD /{owner}/{repo}/resolve/{revision}/{path}      hf_hub_download's metadata: ETag, X-Repo-Commit, Content-Length
    GET  /{owner}/{repo}/resolve/{revision}/{path}      the bytes; honours "Range: bytes=N-" with 206
Missing repos and files answer 404 with the Hub's X-Error-Code (RepoNotFound, EntryNotFound).
``status[path] = code`` answers every request for ``path`` with that HTTP status (e.g. 403).
``plan[path]`` scripts the next GETs of ``path``, one entry each: ("drop", n) sends n body bytes of the promised
length and hangs up; ("status", code) answers with that HTTP error; ("stall", n) sends n body bytes and then
nothing until ``release`` is set. Later GETs are served normally.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> {path in repo: content}
    plan: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    release: threading.Event = field(default_factory=threading.Event)  # ends every "stall"

    def add(self, repo_id: str, path: str, content: bytes) -> None:
        self.repos.setdefault(repo_id, {})[path] = content

    def gets(self, path: str) -> list[Request]:
        """The GET requests for a file's bytes."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(f"/resolve/main/{path}")]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest's output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, *, body: bool) -> None:
            hub.requests.append(Request(self.command, self.path, dict(self.headers.items())))
            path = unquote(urlsplit(self.path).path)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            if tree:
                return self._tree(tree[1])
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                return self._file(resolve[1], resolve[3], body=body)
            self._error(404, "NotFound")

        def _tree(self, repo_id: str) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                return self._error(404, "RepoNotFound")
            listing = [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                       for p, c in sorted(files.items())]
            self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"})

        def _file(self, repo_id: str, name: str, *, body: bool) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                return self._error(404, "RepoNotFound")
            if name not in files:
                return self._error(404, "EntryNotFound")
            if name in hub.status:
                return self._error(hub.status[name], "Forbidden")
            content = files[name]
            headers = {"ETag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Repo-Commit": COMMIT,
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            status, start = 200, 0
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m and body:
                status, start = 206, int(m[1])
                headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            part = content[start:]
            if not body:
                headers["Content-Length"] = str(len(content))
                return self._send(200, b"", headers, length=len(content))
            action, n = hub.plan[name].pop(0) if hub.plan.get(name) else ("serve", 0)
            if action == "status":
                return self._error(n, "Error")
            if action in ("drop", "stall"):  # promise the whole body, send part of it, hang up (or hang)
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(part))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(part[:n])
                self.wfile.flush()
                if action == "stall":
                    hub.release.wait(60)
                self.close_connection = True
                return
            self._send(status, part, headers)

        def _error(self, status: int, code: str) -> None:
            self._send(status, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Repo-Commit": COMMIT, "Content-Type": "application/json"})

        def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on 127.0.0.1 (a free port) in a thread; ``hub.url`` is its HF_ENDPOINT."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        hub.release.set()
        server.shutdown()
        server.server_close()
