"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for testing real `huggingface_hub` downloads offline.

It implements the endpoints that `huggingface_hub` (2.4) calls for `snapshot_download`, `hf_hub_download`,
`HfApi.model_info` and `HfApi.list_repo_files`, with the Hub's headers, redirects and error codes:

- `GET /api/models/{repo_id}[/revision/{rev}]`: the repo's info (`sha`, `siblings`, `cardData`, `gated`, ...);
  `?blobs=true` (`files_metadata=True`) adds each sibling's `size`, `blobId` and `lfs`.
- `GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=&expand=`: the file listing, paginated with a
  `Link: <...>; rel="next"` header past 1000 entries, as on the Hub.
- `HEAD|GET /{repo_id}/resolve/{rev}/{filename}`: a regular (git) file answers 200 with its bytes, `ETag` (its
  git blob id) and `X-Repo-Commit`. An LFS file (by the Hub's default `.gitattributes` patterns, or 10 MiB and up)
  answers 302 with `X-Linked-Etag` (its sha256), `X-Linked-Size`, `X-Repo-Commit` and a signed `Location` on a
  second port that plays the CDN: another origin, so `huggingface_hub` stops at the 302 on HEAD and drops the
  `Authorization` header when it downloads from there, as it does with the Hub's CDN.
- Errors carry `X-Error-Code` / `X-Error-Message` and a JSON `{"error": ...}` body: unknown repo -> RepoNotFound
  (401 without a token, 404 with one, as on the Hub); unknown revision -> 404 RevisionNotFound; unknown file ->
  404 EntryNotFound; a gated repo's files -> 401 GatedRepo without a token, 403 GatedRepo with another token (its
  info and listing stay public, as on the Hub).

File bodies are streamed from disk with `sendfile`, honour `Range` (206, or 416 when unsatisfiable), and carry no
`X-Xet-*` header, so `huggingface_hub` uses its plain HTTP path even with `hf_xet` installed.

    with FakeHub() as hub:
        sha = hub.add_repo("owner/name", folder)
        snapshot_download("owner/name", local_dir=dest, endpoint=hub.url)  # or HF_ENDPOINT=hub.url before import
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import http.server
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

# The Hub's default `.gitattributes` LFS patterns (matched on the file's basename), plus its 10 MiB limit for git.
LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gguf *.gz *.h5 *.joblib *.mlmodel *.model *.msgpack *.npy *.npz *.onnx"
    " *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors *.tar *.tar.* *.tflite *.tgz *.wasm *.xz"
    " *.zip *.zst *tfevents*"
).split()
LFS_MIN_SIZE = 10 * 1024 * 1024
PAGE_SIZE = 1000  # tree entries per page; 50 with expand=true
CHUNK = 1024 * 1024
COMMIT_DATE = "2024-01-01T00:00:00.000Z"
# Paths that `huggingface_hub.upload_folder` never uploads.
IGNORED_DIRS = (".git", ".cache/huggingface")

Headers = dict[str, str]
Request = tuple[str, str, Headers]  # (method, percent-decoded URL path without the query, lower-cased headers)


@dataclass(frozen=True)
class _File:
    disk_path: Path
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None  # set for LFS files
    pointer_size: int | None


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _File]  # repo path -> file
    card_data: dict[str, Any] | None


@dataclass
class _Repo:
    repo_id: str
    gated_token: str | None
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)


@dataclass
class _Fault:
    suffix: str
    method: str | None
    remaining: int
    status: int = 0
    after_bytes: int = 0


class _HubError(Exception):
    """An error answer: status, `X-Error-Code` (if any), message and extra headers."""

    def __init__(self, status: int, code: str | None, message: str, headers: Headers | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size >= LFS_MIN_SIZE or any(fnmatch.fnmatchcase(name, pattern) for pattern in LFS_PATTERNS)


def _snapshot_file(disk_path: Path, repo_path: str) -> _File:
    size = disk_path.stat().st_size
    if not _is_lfs(repo_path, size):
        return _File(disk_path, size, _git_blob_id(disk_path.read_bytes()), None, None)
    digest = hashlib.sha256()
    with disk_path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest.hexdigest()}\nsize {size}\n".encode()
    return _File(disk_path, size, _git_blob_id(pointer), digest.hexdigest(), len(pointer))


def _front_matter(readme: Path) -> dict[str, Any] | None:
    """The YAML metadata block at the top of a model card, as the Hub reads it into `cardData`."""
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    data = yaml.safe_load(text[3:end])
    return data if isinstance(data, dict) else None


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) for a single `bytes=` range; None to serve the whole file. Raises on unsatisfiable."""
    if not value or not value.strip().startswith("bytes=") or "," in value:
        return None
    start_text, _, end_text = value.strip()[len("bytes=") :].partition("-")
    try:
        if not start_text:  # suffix range: the last N bytes
            length = int(end_text)
            if length <= 0 or size == 0:
                raise ValueError
            return max(size - length, 0), size - 1
        start = int(start_text)
        end = min(int(end_text), size - 1) if end_text else size - 1
    except ValueError:
        raise _HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"}) from None
    if start >= size or end < start:
        raise _HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.hub._track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        self.server.hub._handle(self, "GET", cdn=self.server.cdn)

    def do_HEAD(self) -> None:
        self.server.hub._handle(self, "HEAD", cdn=self.server.cdn)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, hub: FakeHub, cdn: bool) -> None:
        self.hub, self.cdn = hub, cdn
        super().__init__(("127.0.0.1", 0), _Handler)


class FakeHub:
    """The Hub's download API on 127.0.0.1 (a daemon thread); `url` is the value for `HF_ENDPOINT`.

    `requests` lists every request seen, hub and CDN ports alike, as `(method, path, headers)`: the URL path
    percent-decoded and without its query string, header names lower-cased. LFS bodies are fetched from the CDN
    port at `/lfs/{sha256}/{filename}`, so a path suffix such as `"unet/model.safetensors"` matches both the
    HEAD on `/resolve/` and the GET of the body.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.limit_bytes_per_s = 0.0  # per connection, for file bodies (0: no limit)
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, _File] = {}  # sha256 -> file, for the CDN
        self._faults: list[_Fault] = []
        self._drops: list[_Fault] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._secret = secrets.token_bytes(16)
        self._servers = [_Server(self, cdn=False), _Server(self, cdn=True)]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._servers[0].server_port}"
        self._cdn_url = f"http://127.0.0.1:{self._servers[1].server_port}"

    # Public API

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        branches: Iterable[str] = ("main",),
        gated_token: str | None = None,
        card_data: Mapping[str, Any] | None = None,
    ) -> str:
        """Serve `folder`'s files (recursively, as they are now) as a commit of `repo_id`; return its sha.

        `branches` are pointed at the commit; adding again to the same repo adds a commit (older ones stay
        reachable by sha). The sha is deterministic: a hash of the repo id, the files and `card_data`. File sizes
        and hashes are recorded now (LFS files are read once for their sha256); bodies are read from disk when
        served, so leave the files unchanged. `gated_token` makes the repo gated: its files need
        `Authorization: Bearer <gated_token>`. `card_data` overrides the YAML front matter of `README.md`.
        """
        root = Path(folder)
        if not root.is_dir():
            raise NotADirectoryError(root)
        files: dict[str, _File] = {}
        for disk_path in sorted(root.rglob("*")):
            repo_path = disk_path.relative_to(root).as_posix()
            if disk_path.is_file() and not any(repo_path == d or repo_path.startswith(d + "/") for d in IGNORED_DIRS):
                files[repo_path] = _snapshot_file(disk_path, repo_path)
        card = dict(card_data) if card_data is not None else None
        if card is None and "README.md" in files:
            card = _front_matter(files["README.md"].disk_path)
        manifest = "".join(f"{f.blob_id} {path}\n" for path, f in files.items())
        sha = hashlib.sha1(f"{repo_id}\n{manifest}{json.dumps(card, sort_keys=True, default=str)}".encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, gated_token))
            repo.gated_token = gated_token
            repo.commits[sha] = _Commit(sha, files, card)
            for branch in branches:
                repo.branches[branch] = sha
            for f in files.values():
                if f.sha256 is not None:
                    self._blobs[f.sha256] = f
        return sha

    def fail(self, path_suffix: str, status: int = 500, times: int = 1, method: str | None = None) -> None:
        """Answer `status` to the next `times` requests (of `method`, if given) whose path ends with `path_suffix`."""
        with self._lock:
            self._faults.append(_Fault(path_suffix, method, times, status=status))

    def drop(self, path_suffix: str, after_bytes: int) -> None:
        """Cut the connection after `after_bytes` bytes of the next file body GET whose path ends with `path_suffix`."""
        with self._lock:
            self._drops.append(_Fault(path_suffix, "GET", 1, after_bytes=after_bytes))

    def clear(self) -> None:
        """Forget the faults not yet used up (fail, drop)."""
        with self._lock:
            self._faults.clear()
            self._drops.clear()

    def close(self) -> None:
        """Stop both ports and cut open keep-alive connections."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Request handling

    def _track(self, connection: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _take(self, faults: list[_Fault], method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in faults:
                if fault.remaining > 0 and path.endswith(fault.suffix) and fault.method in (None, method):
                    fault.remaining -= 1
                    return fault
        return None

    def _handle(self, h: _Handler, method: str, cdn: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        self.requests.append((method, path, headers))
        try:
            fault = self._take(self._faults, method, path)
            if fault is not None:
                raise _HubError(fault.status, None, f"Fake hub: injected HTTP {fault.status} for {path}")
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            segments = url.path.split("/")[1:]
            if cdn:
                self._serve_cdn(h, method, path, segments, query)
            elif segments[:2] == ["api", "models"] and len(segments) > 2:
                self._serve_api(h, method, segments[2:], query, headers)
            elif "resolve" in segments[1:3]:
                self._serve_resolve(h, method, path, segments, headers)
            else:
                raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")
        except _HubError as e:
            self._send_error(h, method, e)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _repo(self, repo_id: str, headers: Headers) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:  # the Hub answers 401 to anonymous requests, not to leak private repos
            raise _HubError(404 if "authorization" in headers else 401, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _commit(repo: _Repo, revision: str) -> _Commit:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]

    @staticmethod
    def _check_gate(repo: _Repo, headers: Headers) -> None:
        if repo.gated_token is None:
            return
        auth = headers.get("authorization")
        if auth == f"Bearer {repo.gated_token}":
            return
        if auth is None:
            message = (
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated"
                " to access it. Please log in."
            )
            raise _HubError(401, "GatedRepo", message)
        message = (
            f"Access to model {repo.repo_id} is restricted and you are not in the authorized list."
            f" Visit https://huggingface.co/{repo.repo_id} to ask for access."
        )
        raise _HubError(403, "GatedRepo", message)

    def _split_repo(self, segments: list[str]) -> tuple[str, list[str]]:
        """Split URL segments into a repo id (`name` or `owner/name`) and the rest."""
        two = "/".join(segments[:2])
        if len(segments) >= 2 and segments[1] in ("revision", "tree", "resolve") and two not in self._repos:
            return segments[0], segments[1:]
        return two, segments[2:]

    def _serve_api(self, h: _Handler, method: str, segments: list[str], query: Headers, headers: Headers) -> None:
        repo_id, rest = self._split_repo(segments)
        repo = self._repo(repo_id, headers)
        if not rest or (rest[0] == "revision" and len(rest) == 2):
            commit = self._commit(repo, unquote(rest[1]) if rest else "main")
            info = self._model_info(repo, commit, blobs=query.get("blobs", "").lower() == "true")
            if "expand" in query:
                wanted = {"_id", "id", *parse_qs(urlsplit(h.path).query).get("expand", [])}
                info = {k: v for k, v in info.items() if k in wanted}
            self._send_json(h, method, info)
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, unquote(rest[1]))
            self._serve_tree(h, method, repo, commit, unquote("/".join(rest[2:])), query)
        else:
            raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _model_info(self, repo: _Repo, commit: _Commit, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path, f in commit.files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=f.size, blobId=f.blob_id)
                if f.sha256 is not None:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(sibling)
        card = commit.card_data or {}
        tags = [str(tag) for tag in card.get("tags") or []]
        tags += [str(card[key]) for key in ("library_name", "pipeline_tag") if card.get(key)]
        tags += [f"license:{card['license']}"] if card.get("license") else []
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": COMMIT_DATE,
            "createdAt": COMMIT_DATE,
            "private": False,
            "disabled": False,
            "gated": "manual" if repo.gated_token is not None else False,
            "downloads": 0,
            "likes": 0,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": tags,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if commit.card_data is not None:
            info["cardData"] = commit.card_data
        return {k: v for k, v in info.items() if v is not None}

    def _serve_tree(self, h: _Handler, method: str, repo: _Repo, commit: _Commit, folder: str, query: Headers) -> None:
        recursive = query.get("recursive", "").lower() == "true"
        expand = query.get("expand", "").lower() == "true"
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, f in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):  # folders on the way
                folder_path = prefix + "/".join(parts[:i])
                oid = hashlib.sha1(f"{commit.sha}:{folder_path}".encode()).hexdigest()
                entries.setdefault(folder_path, {"type": "directory", "oid": oid, "size": 0, "path": folder_path})
            if recursive or len(parts) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
                if f.sha256 is not None:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                entries[path] = entry
        if prefix and not entries:
            raise _HubError(404, "EntryNotFound", f'{folder} does not exist on "{commit.sha}"')
        listing = sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))
        if expand:
            last_commit = {"id": commit.sha, "title": "Fake commit", "date": COMMIT_DATE}
            listing = [{**e, "lastCommit": last_commit} for e in listing]
        page_size = 50 if expand else PAGE_SIZE
        start = int(base64.urlsafe_b64decode(query["cursor"]).decode()) if "cursor" in query else 0
        extra: Headers = {}
        if start + page_size < len(listing):
            cursor = base64.urlsafe_b64encode(str(start + page_size).encode()).decode()
            params = urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(), "cursor": cursor})
            extra["Link"] = f'<{self.url}{urlsplit(h.path).path}?{params}>; rel="next"'
        self._send_json(h, method, listing[start : start + page_size], extra)

    def _serve_resolve(self, h: _Handler, method: str, path: str, segments: list[str], headers: Headers) -> None:
        repo_id, rest = self._split_repo(segments)
        if len(rest) < 3 or rest[0] != "resolve":
            raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")
        repo = self._repo(repo_id, headers)
        self._check_gate(repo, headers)
        commit = self._commit(repo, unquote(rest[1]))
        filename = unquote("/".join(rest[2:]))
        f = commit.files.get(filename)
        if f is None:
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        common = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": _disposition(filename),
        }
        if f.sha256 is None:
            self._send_file(h, method, path, f, {**common, "ETag": f'"{f.blob_id}"'})
            return
        expires = int(time.time()) + 3600
        location = (
            f"{self._cdn_url}/lfs/{f.sha256}/{quote(filename)}?Expires={expires}"
            f"&Signature={self._sign(f.sha256, expires)}"
        )
        body = f"Found. Redirecting to {location}".encode()
        redirect = {
            **common,
            "Location": location,
            "ETag": f'"{f.blob_id}"',
            "X-Linked-Etag": f'"{f.sha256}"',
            "X-Linked-Size": str(f.size),
            "Content-Type": "text/plain; charset=utf-8",
        }
        self._send(h, method, 302, redirect, body)

    def _sign(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()

    def _serve_cdn(self, h: _Handler, method: str, path: str, segments: list[str], query: Headers) -> None:
        f = self._blobs.get(segments[1]) if len(segments) >= 3 and segments[0] == "lfs" else None
        expires = query.get("Expires", "")
        valid = (
            f is not None
            and expires.isdigit()
            and int(expires) >= time.time()
            and hmac.compare_digest(query.get("Signature", ""), self._sign(segments[1], int(expires)))
        )
        if f is None or not valid:
            raise _HubError(403, None, "AccessDenied: Access denied")
        self._send_file(h, method, path, f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    # Responses

    @staticmethod
    def _send(h: _Handler, method: str, status: int, headers: Headers, body: bytes = b"") -> None:
        h.send_response(status)
        h.send_header("X-Request-Id", f"Root=1-{uuid.uuid4().hex}")
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD" and body:
            h.wfile.write(body)

    def _send_json(self, h: _Handler, method: str, data: object, headers: Headers | None = None) -> None:
        body = json.dumps(data).encode()
        self._send(h, method, 200, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    def _send_error(self, h: _Handler, method: str, e: _HubError) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": e.message, **e.headers}
        if e.code is not None:
            headers["X-Error-Code"] = e.code
        self._send(h, method, e.status, headers, json.dumps({"error": e.message}).encode())

    def _send_file(self, h: _Handler, method: str, path: str, f: _File, headers: Headers) -> None:
        if f.disk_path.stat().st_size != f.size:
            raise _HubError(500, None, f"Fake hub: {f.disk_path} changed size since add_repo")
        byte_range = _parse_range(h.headers.get("Range"), f.size)
        start, end = byte_range if byte_range is not None else (0, f.size - 1)
        length = end - start + 1
        h.send_response(206 if byte_range is not None else 200)
        h.send_header("X-Request-Id", f"Root=1-{uuid.uuid4().hex}")
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Type", "application/octet-stream")
        if byte_range is not None:
            h.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if method == "HEAD" or length <= 0:
            return
        drop = self._take(self._drops, method, path)
        count = min(length, drop.after_bytes) if drop is not None else length
        with f.disk_path.open("rb") as body:
            sent = self._sendfile(h.connection, body, start, count) if count > 0 else 0
        if drop is not None or sent < length:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)

    def _sendfile(self, connection: socket.socket, body: Any, start: int, count: int) -> int:
        """Send `count` bytes of `body` from `start`, at most `limit_bytes_per_s` per connection if set (as CDNs
        cap each stream)."""
        if not self.limit_bytes_per_s:
            return connection.sendfile(body, start, count)
        began, sent = time.monotonic(), 0
        while sent < count:
            sent += connection.sendfile(body, start + sent, min(256 << 10, count - sent))
            time.sleep(max(0.0, began + sent / self.limit_bytes_per_s - time.monotonic()))
        return sent


def _disposition(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
