"""A local stand-in for the Hugging Face Hub: an HTTP server that speaks the part of the Hub's API
that `huggingface_hub.snapshot_download` and `datasets.load_dataset` use, serving repositories from
a local directory. Tests point `HF_ENDPOINT` at it; there is no network here.

Layout served: `<root>/models/<org>/<name>/...` and `<root>/datasets/<org>/<name>/...`, each a
plain directory of files at a single revision ("main"), whose commit hash is derived from the
files' contents. Endpoints (the subset the pinned huggingface_hub 1.33 / datasets 5.2 call):

  GET  /api/{models,datasets}/ORG/NAME[/revision/REV]     repo info with `siblings` and `sha`
  GET  /api/{models,datasets}/ORG/NAME/tree/REV[/PATH]    directory listing (`recursive` honoured)
  POST /api/{models,datasets}/ORG/NAME/paths-info/REV     info on given paths
  HEAD/GET [/datasets]/ORG/NAME/resolve/REV/PATH          a file, with X-Repo-Commit / ETag /
                                                          Content-Length; Range requests honoured

Anything else is a 404 with the Hub's X-Error-Code header. Every request is recorded in
`HubServer.requests` (method and path) so tests can tell whether a run went to the "hub" at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

KINDS = {"models": "models", "datasets": "datasets"}


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class _Repo:
    def __init__(self, path: Path):
        self.path = path
        self.files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        self.sha = digest.hexdigest()

    def entry(self, rel: str) -> dict | None:
        target = self.path / rel if rel else self.path
        if target.is_file():
            data = target.read_bytes()
            return {"type": "file", "path": rel, "size": len(data), "oid": _sha(data)}
        if target.is_dir():
            return {"type": "directory", "path": rel, "oid": _sha(rel.encode())}
        return None

    def tree(self, rel: str, recursive: bool) -> list[dict] | None:
        base = self.path / rel if rel else self.path
        if not base.is_dir():
            return None
        children = base.rglob("*") if recursive else base.iterdir()
        return [self.entry(p.relative_to(self.path).as_posix()) for p in sorted(children)]


class HubServer:
    """`with HubServer(root) as hub:` serves `root` on 127.0.0.1 at `hub.url` until the block ends."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, "HEAD")

            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- request handling ---------------------------------------------------------------------

    def _repo(self, kind: str, repo_id: str) -> _Repo | None:
        path = self.root / kind / repo_id
        return _Repo(path) if path.is_dir() and "/" in repo_id else None

    @staticmethod
    def _send(handler, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        handler.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body and not head:
            handler.wfile.write(body)

    def _json(self, handler, value) -> None:
        self._send(handler, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _not_found(self, handler, code: str, head: bool = False) -> None:
        self._send(handler, 404, json.dumps({"error": code}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": code}, head)

    def _handle(self, handler, method: str) -> None:
        url = urlparse(handler.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        self.requests.append((method, path))
        body = b""
        if method == "POST":
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/([^/]+)(?:/(.*))?)?$", path)
        if m:
            kind, repo_id, what, _rev, rel = m.groups()
            repo = self._repo(kind, repo_id)
            if repo is None:
                return self._not_found(handler, "RepoNotFound")
            if what in (None, "revision"):
                return self._json(handler, {
                    "id": repo_id, "sha": repo.sha, "private": False, "disabled": False, "gated": False,
                    "tags": [], "siblings": [{"rfilename": name} for name in repo.files],
                    "lastModified": "2025-01-01T00:00:00.000Z", "cardData": {},
                })
            if what == "tree":
                listing = repo.tree(rel or "", query.get("recursive", ["False"])[0].lower() == "true")
                if listing is None:
                    return self._not_found(handler, "EntryNotFound")
                return self._json(handler, listing)
            # paths-info: form-encoded (or JSON) list of paths
            if handler.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(body or b"{}").get("paths", [])
            else:
                paths = parse_qs(body.decode()).get("paths", [])
            return self._json(handler, [e for e in (repo.entry(p) for p in paths) if e is not None])
        m = re.match(r"^/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and method in ("HEAD", "GET"):
            kind, repo_id, _rev, rel = m.groups()
            repo = self._repo(kind or "models", repo_id)
            head = method == "HEAD"
            if repo is None:
                return self._not_found(handler, "RepoNotFound", head)
            target = repo.path / rel
            if not target.is_file():
                return self._not_found(handler, "EntryNotFound", head)
            data = target.read_bytes()
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{_sha(data)}"', "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            rng = re.match(r"bytes=(\d+)-(\d*)$", handler.headers.get("Range", ""))
            if rng and not head:
                start = int(rng.group(1))
                end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                chunk = data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
                return self._send(handler, 206, chunk, headers)
            return self._send(handler, 200, data, headers, head)
        self._not_found(handler, "RepoNotFound", method == "HEAD")


STUB_MODEL = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": b"stub weights",
              "tokenizer_config.json": b"{}"}


def cache_model(cache_dir: Path, repo_id: str, files: dict[str, bytes] | None = None) -> Path:
    """Put a snapshot of repo_id into an HF cache (huggingface_hub's layout: refs/main -> snapshots/<commit>)
    as if it had been downloaded; by default stub files that only pass the presence checks. The snapshot."""
    files = STUB_MODEL if files is None else files
    folder = Path(cache_dir) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot
