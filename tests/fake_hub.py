"""A local stand-in for the Hugging Face Hub's upload API, served on 127.0.0.1.

It speaks the endpoints ``huggingface_hub`` uses to create a dataset repo and commit files
to it, as the real Hub does:

- ``POST /api/repos/create``                         create a repo (409 with the repo's ``url`` when it
                                                     exists: ``create_repo(exist_ok=True)`` reads it)
- ``POST /api/validate-yaml``                        the client checks README.md metadata first
- ``POST /api/{type}s/{repo}/branch/{branch}``       create a branch from main (409 when it exists)
- ``POST /api/{type}s/{repo}/preupload/{rev}``       per file: ``regular`` or ``lfs`` upload mode
- ``POST /{type}s/{repo}.git/info/lfs/objects/batch`` LFS batch API: where to PUT each blob
- ``PUT  /lfs-upload/{oid}`` and ``POST /lfs-verify``  the blob store (checks the sha256)
- ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``   list a tree (``recursive``), paginated by a ``Link``
                                                     header with a ``cursor``, as ``list_repo_files`` reads it
- ``POST /api/{type}s/{repo}/commit/{rev}``          NDJSON commit: header, then ``file``, ``lfsFile``,
                                                     ``deletedFile`` and ``deletedFolder`` operations

Like the Hub, parquet files and files over 10 MB are asked for as LFS (and listed with their
``lfs`` pointer info), a commit to a branch that does not exist is a 404 ``RevisionNotFound``,
deleting a file or folder that is not there (or listing a folder that is not there) is a 404
``EntryNotFound``, revisions and paths arrive URL-encoded, and every API call needs the
expected bearer token. Xet storage is not implemented: tests disable it on the client with
``HF_HUB_DISABLE_XET`` (a documented switch users have too), which makes the client use
the LFS batch API.

Committed files are written under ``root/repos/<type>s/<org>/<name>/<branch>/`` so tests
read back exactly what was received; every request (method, path, Authorization header) is
logged in ``requests``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode

import yaml

LFS_THRESHOLD = 10 * 1024 * 1024
_REPO = r"(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+?)"


@dataclass
class Commit:
    repo: str
    revision: str
    summary: str
    description: str
    paths: list[str]  # added or updated
    oid: str
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


class FakeHub:
    def __init__(self, root: Path, token: str) -> None:
        self.root = Path(root)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.commits: list[Commit] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.tree_page_size = 1000  # the Hub's page size for a tree listing without ``expand``
        self._query: dict[str, str] = {}  # the query string of the request being handled (under the lock)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    def repo_dir(self, repo_id: str, revision: str = "main") -> Path:
        repo = self.repos[repo_id]
        return self.root / "repos" / f"{repo.type}s" / repo_id / revision

    # -- request handling (called from server threads) ----------------------------------
    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes, query: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], Any]:
        self.requests.append((method, path, headers.get("authorization")))
        if method == "PUT" and (m := re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)):
            return self._lfs_put(m["oid"], body)
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {}, {"error": "Invalid credentials in Authorization header"}
        data = body.decode("utf-8") if body else ""
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", rf"/api/{_REPO}/branch/(?P<branch>.+)", self._create_branch),
            ("POST", rf"/api/{_REPO}/preupload/(?P<rev>.+)", self._preupload),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("POST", r"/lfs-verify", self._lfs_verify),
            ("POST", rf"/api/{_REPO}/commit/(?P<rev>.+)", self._commit),
            ("GET", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._tree),
        ]
        for verb, pattern, fn in routes:
            if method == verb and (m := re.fullmatch(pattern, path)):
                parts = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                with self._lock:
                    self._query = query or {}
                    return fn(parts, data)
        return 404, {}, {"error": f"fake hub: no route for {method} {path}"}

    def _repo(self, parts: dict[str, str], rev: str | None = None) -> Repo | tuple[int, dict[str, str], Any]:
        repo = self.repos.get(parts["repo"])
        if repo is None or f"{repo.type}s" != parts["type"]:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if rev is not None and rev not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"}
        return repo

    def _create_repo(self, _: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        payload = json.loads(data)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        kind = payload.get("type") or "model"
        prefix = "" if kind == "model" else f"{kind}s/"
        url = f"{self.url}/{prefix}{repo_id}"
        if repo_id in self.repos:
            return 409, {}, {"error": f"You already created this {kind} repo", "url": url}
        self.repos[repo_id] = Repo(type=kind, private=payload.get("visibility") == "private")
        return 200, {}, {"url": url, "name": repo_id}

    def _validate_yaml(self, _: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        content = json.loads(data)["content"]
        m = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else None
        except yaml.YAMLError as exc:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {exc}"}]}
        if m and not isinstance(meta, dict):
            return 400, {}, {"errors": [{"message": "metadata must be a mapping"}]}
        return 200, {}, {"errors": [], "warnings": []}

    def _create_branch(self, parts: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(parts)
        if not isinstance(repo, Repo):
            return repo
        if parts["branch"] in repo.branches:
            return 409, {}, {"error": "Reference already exists"}
        start = (json.loads(data) if data else {}).get("startingPoint") or "main"
        if start not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {start}"}
        repo.branches[parts["branch"]] = dict(repo.branches[start])
        target = self.root / "repos" / parts["type"] / parts["repo"] / parts["branch"]
        for rel, content in repo.branches[start].items():  # the branch's files, as a commit would write them
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (target / rel).write_bytes(content)
        return 200, {}, {}

    def _preupload(self, parts: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(parts, parts["rev"])
        if not isinstance(repo, Repo):
            return repo
        files = []
        for f in json.loads(data)["files"]:
            lfs = f["path"].endswith(".parquet") or f["size"] > LFS_THRESHOLD
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None}
            )
        return 200, {}, {"files": files}

    def _lfs_batch(self, parts: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(parts)
        if not isinstance(repo, Repo):
            return repo
        payload = json.loads(data)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.blobs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/lfs-verify"},
                }
            objects.append(entry)
        return 200, {}, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, oid: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {}, {"error": "sha256 mismatch"}
        with self._lock:
            self.blobs[oid] = body
        return 200, {}, {}

    def _lfs_verify(self, _: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        payload = json.loads(data)
        blob = self.blobs.get(payload["oid"])
        if blob is None or len(blob) != payload["size"]:
            return 404, {}, {"error": "object not uploaded"}
        return 200, {}, {}

    def _commit(self, parts: dict[str, str], data: str) -> tuple[int, dict[str, str], Any]:
        repo = self._repo(parts, parts["rev"])
        if not isinstance(repo, Repo):
            return repo
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return 400, {}, {"error": "commit payload must start with a header line"}
        header, branch = lines[0]["value"], repo.branches[parts["rev"]]
        files, added, deleted = dict(branch), set(), set()  # in order; the branch changes only if all succeed
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                files[path] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.blobs.get(value["oid"])
                if blob is None:
                    return 400, {}, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[path] = blob
            elif key == "deletedFile" or key == "deletedFolder":
                if key == "deletedFile":
                    gone = [path] if path in files else []
                else:
                    gone = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not gone:
                    return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{path} does not exist in this revision"}
                for p in gone:
                    del files[p]
                added.difference_update(gone)
                deleted.update(gone)
                continue
            else:
                return 400, {}, {"error": f"fake hub: unsupported operation {key}"}
            added.add(path)
            deleted.discard(path)
        target = self.root / "repos" / parts["type"] / parts["repo"] / parts["rev"]
        for rel in set(branch) - set(files):  # git has no empty folders: prune them too
            (target / rel).unlink(missing_ok=True)
            for parent in (target / rel).parents:
                if parent == target or not parent.is_dir() or any(parent.iterdir()):
                    break
                parent.rmdir()
        for rel, content in files.items():
            if branch.get(rel) != content or not (target / rel).exists():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(content)
        branch.clear()
        branch.update(files)
        staged, removed = sorted(added), sorted(deleted)
        oid = hashlib.sha1(json.dumps([header, staged, removed]).encode() + str(len(self.commits)).encode()).hexdigest()
        description = header.get("description", "")
        self.commits.append(Commit(parts["repo"], parts["rev"], header["summary"], description, staged, oid, removed))
        url = f"{self.url}/{parts['type']}/{parts['repo']}/commit/{oid}"
        return 200, {}, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None, "success": True}

    def _tree(self, parts: dict[str, str], _: str) -> tuple[int, dict[str, str], Any]:
        """``GET /api/{type}s/{repo}/tree/{rev}[/{path}]``: the Hub's entries, one page per request."""
        repo = self._repo(parts, parts["rev"])
        if not isinstance(repo, Repo):
            return repo
        files = repo.branches[parts["rev"]]
        base = parts.get("path", "").strip("/")
        recursive = self._query.get("recursive", "false").lower() == "true"
        prefix = f"{base}/" if base else ""
        under = sorted(p for p in files if p.startswith(prefix))
        if base and not under:
            return 404, {"X-Error-Code": "EntryNotFound"}, {"error": f"{base} does not exist on {parts['rev']}"}
        entries: dict[str, dict[str, Any]] = {}
        for path in under:
            rel = path[len(prefix) :].split("/")
            for depth in range(1, len(rel)):  # the folders on the way
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": _sha1(folder.encode()), "size": 0})
            if recursive or len(rel) == 1:
                entries[path] = _file_entry(path, files[path])
        listing = [{**entry, "path": path} for path, entry in sorted(entries.items())]
        start = int(base64.urlsafe_b64decode(self._query["cursor"]).decode()) if "cursor" in self._query else 0
        end = start + self.tree_page_size
        headers = {}
        if end < len(listing):
            cursor = base64.urlsafe_b64encode(str(end).encode()).decode()
            query = urlencode({**self._query, "cursor": cursor})
            where = f"{self.url}/api/{parts['type']}/{parts['repo']}/tree/{quote(parts['rev'], safe='')}"
            where += f"/{quote(base, safe='')}" if base else ""
            headers["Link"] = f'<{where}?{query}>; rel="next"'
        return 200, headers, listing[start:end]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _file_entry(path: str, content: bytes) -> dict[str, Any]:
    """A file as the tree API lists it: git blob oid, size, and the LFS pointer info for LFS files."""
    if path.endswith(".parquet") or len(content) > LFS_THRESHOLD:
        sha256 = hashlib.sha256(content).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()
        blob = _sha1(b"blob %d\0" % len(pointer) + pointer)
        return {
            "type": "file",
            "oid": blob,
            "size": len(content),
            "lfs": {"oid": sha256, "size": len(content), "pointerSize": len(pointer)},
        }
    return {"type": "file", "oid": _sha1(b"blob %d\0" % len(content) + content), "size": len(content)}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            path, _, raw_query = self.path.partition("?")
            query = {k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
            status, extra, payload = hub.handle(self.command, path, headers, body, query)
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = _serve

    return Handler
