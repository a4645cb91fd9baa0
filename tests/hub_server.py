"""A small Hugging Face Hub test double on 127.0.0.1, so the real ``huggingface_hub`` client can be tested offline.

It implements the endpoints ``HfApi``/``hf_hub_download`` (huggingface_hub 2.x) call to push and pull a model repo:
create a repo, validate a card's YAML, create a branch, pre-upload (every file is "regular", sent inline in the
commit), commit (NDJSON), repo and revision info, the file tree, and ``/resolve`` downloads with the HEAD metadata headers. It
stores what it receives (``server.repos``) and answers errors with the Hub's ``X-Error-Code`` headers, so the client
raises the same exception types as against the real Hub. ``cut_downloads_after`` makes it drop the connection in the
middle of a file download. Not a product feature: only the tests use it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(rf"/api/models/{_REPO}/branch/{_REV}"), "create_branch"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/{_REV}"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/{_REV}"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}/revision/{_REV}"), "repo_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/{_REV}"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}"), "repo_info"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)"), "resolve"),
]


@dataclass
class Repo:
    """One model repository: branches point at commits; a commit is a full snapshot {path: bytes}."""

    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub(ThreadingHTTPServer):
    """``with FakeHub(tokens={"secret": "alice"}) as hub:`` then point ``HF_ENDPOINT`` at ``hub.endpoint``."""

    daemon_threads = True

    def __init__(self, tokens: dict[str, str], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.cut_downloads_after: int | None = None  # bytes sent before a GET /resolve drops the connection
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    # --- the API, one method per route ------------------------------------------------------------------------
    def user(self, handler: _Handler, required: bool) -> str | None:
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            if required:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        user = self.tokens.get(header.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def readable(self, handler: _Handler, repo_id: str) -> Repo:
        user = self.user(handler, required=False)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, handler: _Handler, repo_id: str) -> Repo:
        user = self.user(handler, required=True)
        repo = self.readable(handler, repo_id)
        if user != repo.owner:
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    def create_repo(self, handler: _Handler, body: bytes) -> dict:
        user = self.user(handler, required=True)
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to create a repo under {repo_id.split('/')[0]}")
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
            repo = Repo(
                owner=user, private=payload.get("visibility") == "private" or bool(payload.get("private"))
            )
            initial = _sha({})
            repo.commits[initial], repo.branches["main"], repo.messages[initial] = (
                {},
                initial,
                "initial commit",
            )
            self.repos[repo_id] = repo
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id}

    def validate_yaml(self, handler: _Handler, body: bytes) -> dict:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            raise HubError(400, "Invalid YAML in README.md") from err
        if match and not isinstance(metadata, dict):
            raise HubError(400, "README.md metadata must be a mapping")
        return {"warnings": [], "errors": []}

    def whoami(self, handler: _Handler, body: bytes) -> dict:
        user = self.user(handler, required=True)
        return {"type": "user", "name": user, "auth": {"type": "access_token"}}

    def create_branch(self, handler: _Handler, body: bytes, repo: str, rev: str) -> dict:
        target = self.writable(handler, repo)
        with self._lock:
            if rev in target.branches:
                raise HubError(409, f"Branch {rev} already exists")
            start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
            sha = target.resolve(start)
            if sha is None:
                raise HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            target.branches[rev] = sha
        return {}

    def preupload(self, handler: _Handler, body: bytes, repo: str, rev: str) -> dict:
        self.writable(handler, repo)
        files = json.loads(body)["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def commit(self, handler: _Handler, body: bytes, repo: str, rev: str) -> dict:
        target = self.writable(handler, repo)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        with self._lock:
            if rev not in target.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            snapshot = dict(target.commits[target.branches[rev]])
            message = ""
            for item in lines:
                value = item["value"]
                if item["key"] == "header":
                    message = value.get("summary", "")
                elif item["key"] == "file":
                    content = value["content"]
                    snapshot[value["path"]] = (
                        base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    )
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    snapshot = {p: c for p, c in snapshot.items() if not p.startswith(value["path"])}
                else:
                    raise HubError(400, f"unsupported commit operation {item['key']!r} (LFS is not emulated)")
            sha = _sha(snapshot, parent=target.branches[rev], message=message)
            target.commits[sha], target.messages[sha], target.branches[rev] = snapshot, message, sha
        return {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha}

    def repo_info(self, handler: _Handler, body: bytes, repo: str, rev: str = "main") -> dict:
        target = self.readable(handler, repo)
        sha = target.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = target.commits[sha]
        return {
            "id": repo,
            "author": target.owner,
            "sha": sha,
            "private": target.private,
            "siblings": [
                {"rfilename": path, "size": len(content)} for path, content in sorted(files.items())
            ],
        }

    def tree(self, handler: _Handler, body: bytes, repo: str, rev: str) -> list:
        """The recursive file listing (no folders entries needed by snapshot_download; one page)."""
        target = self.readable(handler, repo)
        sha = target.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = target.commits[sha]
        return [
            {"type": "file", "path": path, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for path, content in sorted(files.items())
        ]

    def resolve(self, handler: _Handler, repo: str, rev: str, path: str) -> tuple[bytes, dict[str, str]]:
        target = self.readable(handler, repo)
        sha = target.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        content = target.commits[sha].get(path)
        if content is None:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return content, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}


def _sha(snapshot: dict[str, bytes], parent: str = "", message: str = "") -> str:
    digest = hashlib.sha1(f"{parent}\n{message}\n".encode())
    for path in sorted(snapshot):
        digest.update(path.encode() + b"\0" + snapshot[path])
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((method, path))
        for route_method, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if route_method != method or not match:
                continue
            try:
                if name == "resolve":
                    content, headers = self.server.resolve(self, **match.groupdict())
                    self._send_file(method, content, headers)
                else:
                    self._send_json(200, getattr(self.server, name)(self, body, **match.groupdict()))
            except HubError as err:
                headers = {"X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send_json(
                    err.status, {"error": err.message, **err.extra}, headers, head=method == "HEAD"
                )
            return
        self._send_json(404, {"error": f"no route for {method} {path}"})

    def _send_json(
        self, status: int, payload: dict | list, headers: dict | None = None, head: bool = False
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _send_file(self, method: str, content: bytes, headers: dict[str, str]) -> None:
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if method == "HEAD":
            return
        cut = self.server.cut_downloads_after
        if cut is not None and cut < len(content):
            self.wfile.write(content[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the peer sees a truncated body: a network failure mid-download
            return
        self.wfile.write(content)


if (
    __name__ == "__main__"
):  # a loopback Hub for a manual session: python tests/hub_server.py --user alice:hf_token
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Run the Hub test double on 127.0.0.1 until interrupted.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", action="append", default=[], help="NAME:TOKEN (repeatable)")
    options = parser.parse_args()
    users = dict(u.split(":", 1) for u in options.user)
    with FakeHub(tokens={token: name for name, token in users.items()}, port=options.port) as hub:
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        while True:
            time.sleep(3600)
