"""A loopback Hugging Face Hub for the tests: the endpoints the real ``huggingface_hub`` client calls.

Model repos (and Spaces: ``type: space`` with an ``sdk``; their paths say ``spaces`` where a model's say ``models``
or nothing, and :meth:`LoopbackHub.files` takes ``"spaces/<id>"``) live in memory as chains of commits, so
branches, commit shas and revisions behave as on the Hub. Implemented (``<id>`` = ``namespace/name``, ``<rev>``
= branch name or 40-hex commit sha, URL-quoted):

==========================================================  ==============================================
``POST /api/repos/create``                                  create (409 + url when it exists: ``exist_ok``)
``POST /api/validate-yaml``                                 YAML front matter check of README.md
``POST /api/models/<id>/preupload/<rev>``                   regular or LFS upload mode per file
``POST /<id>.git/info/lfs/objects/batch``                   LFS basic transfer: upload + verify hrefs
``PUT /_lfs/<oid>``, ``POST /_lfs/<oid>/verify``            LFS object upload (sha256 checked) and verify
``POST /api/models/<id>/commit/<rev>``                      NDJSON commit: file / lfsFile / deletedFile /
                                                            deletedFolder; all-or-nothing
``POST /api/models/<id>/branch/<branch>``                   create a branch (409 when it exists)
``GET /api/models/<id>[/revision/<rev>]``                   repo info: ``sha``, ``siblings``
``GET /api/models/<id>/tree/<rev>[/<path>]``                tree listing (``recursive=true``)
``HEAD|GET /<id>/resolve/<rev>/<path>``                     download with ``X-Repo-Commit`` and ETags
``GET /api/whoami-v2``                                      who the token belongs to
==========================================================  ==============================================

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). Writes need ``Authorization: Bearer <token>`` with a known token;
any request with an unknown token gets 401 "Invalid credentials in Authorization header", like the Hub.
Private repos are readable only with a valid token. :meth:`LoopbackHub.fail_next` injects transient
failures (5xx or a dropped connection) so retry logic can be tested; :attr:`LoopbackHub.requests` records
every request (method, path, status; never headers, so no token is kept).

Use the ``hub`` fixture (``from hub_server import hub_fixture`` in a test module): it starts a server on 127.0.0.1, points
``HF_ENDPOINT`` (and the values ``huggingface_hub.constants`` read at import) at it, disables Xet (the
client would otherwise hang on a server without Xet storage), sets a valid dummy ``HF_TOKEN``, and lifts
the test-wide offline mode for the duration of the test.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

VALID_TOKEN = "hf_loopback_test_token_0123456789"
USER = "hfx-tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".gif", ".npz", ".npy")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub also sends any file of 10 MB or more to LFS
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclasses.dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """The git object id: of the pointer file for LFS blobs, like git-lfs."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.content)) if self.lfs else self.content)


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]
    date: str


@dataclasses.dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str]
    commits: dict[str, Commit]
    sdk: str | None = None  # a Space's

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision) if _COMMIT_SHA.match(revision) else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class LoopbackHub:
    """The Hub's state plus the HTTP server that exposes it. ``url`` is the endpoint."""

    def __init__(self, tokens: tuple[str, ...] = (VALID_TOKEN,)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._failures: list[tuple[str, str, int]] = []  # (method, path regex, status; 0 drops the connection)
        self._lock = threading.RLock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ----------------------------------------------------------------------------- for tests
    def fail_next(self, method: str, path_pattern: str, statuses: list[int]) -> None:
        """The next ``len(statuses)`` requests whose method and path (regex search) match get these
        statuses instead of an answer; status 0 closes the connection without handling the request, -1
        handles it and then closes the connection without answering (a lost response)."""
        with self._lock:
            self._failures.extend((method, path_pattern, status) for status in statuses)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> content of the repo at ``revision``."""
        commit = self.repos[repo_id].resolve(revision)
        return {path: blob.content for path, blob in commit.files.items()}

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits) if repo_id in self.repos else 0

    def lfs_paths(self, repo_id: str, revision: str = "main") -> set[str]:
        commit = self.repos[repo_id].resolve(revision)
        return {path for path, blob in commit.files.items() if blob.lfs}

    def new_repo_id(self, name: str = "model") -> str:
        """A repo id no other test uses (the download cache is shared by the test session)."""
        return f"{USER}/{name}-{uuid.uuid4().hex[:10]}"

    # ----------------------------------------------------------------------------- state changes
    def _authorized(self, headers, write: bool) -> bool:
        auth = headers.get("Authorization")
        if auth is None:
            if write:
                raise HubError(401, "Invalid username or password.")
            return False
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _new_commit(self, repo: Repo, branch: str, parent: str | None, message: str, files: dict[str, Blob]) -> Commit:
        digest = hashlib.sha1(json.dumps(
            [parent, message, sorted((p, b.oid) for p, b in files.items()), uuid.uuid4().hex]).encode()).hexdigest()
        commit = Commit(digest, parent, message, files, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[digest] = commit
        repo.branches[branch] = digest
        return commit

    def create_repo(self, body: dict, headers) -> tuple[int, dict]:
        self._authorized(headers, write=True)
        repo_type = body.get("type", "model")
        if repo_type not in ("model", "space"):
            raise HubError(400, "this loopback Hub serves model repos and Spaces only")
        if repo_type == "space" and body.get("sdk") not in ("gradio", "docker", "static"):
            raise HubError(400, f"a Space needs an sdk (gradio, docker or static), got {body.get('sdk')!r}")
        name, namespace = body.get("name"), body.get("organization") or USER
        if not name or not re.fullmatch(r"[\w.\-]+", name):
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{namespace}/{name}"
        key = repo_id if repo_type == "model" else f"spaces/{repo_id}"
        with self._lock:
            if key in self.repos:
                return 409, {"error": f"You already created this {repo_type} repo", "url": f"{self.url}/{key}"}
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = self.repos[key] = Repo(repo_id, private, {}, {}, body.get("sdk") if repo_type == "space" else None)
            self._new_commit(repo, "main", None, "initial commit", {
                ".gitattributes": Blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", False)})
        return 200, {"url": f"{self.url}/{key}", "name": repo_id, "id": repo_id}

    def preupload(self, repo_id: str, revision: str, body: dict, headers) -> dict:
        repo = self._repo(repo_id, self._authorized(headers, write=True))
        self._commit(repo, revision)
        files = []
        for item in body.get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        return {"files": files, "commitOid": repo.branches.get(revision, revision)}

    def lfs_batch(self, repo_id: str, body: dict, headers) -> dict:
        self._repo(repo_id, self._authorized(headers, write=True))
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/_lfs/{obj['oid']}/verify"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not match sha256 {oid}")
        with self._lock:
            self.lfs_objects[oid] = data

    def lfs_verify(self, oid: str, body: dict) -> dict:
        data = self.lfs_objects.get(oid)
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"LFS object {oid} was not uploaded")
        return {"success": True}

    def commit(self, repo_id: str, revision: str, lines: list[dict], headers) -> dict:
        repo = self._repo(repo_id, self._authorized(headers, write=True))
        with self._lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            files = dict(head.files)
            header = {}
            # Validate and apply to a copy: the branch moves only if every line is valid (no partial commit).
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "header":
                    header = value
                elif key == "file":
                    files[value["path"]] = Blob(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    data = self.lfs_objects.get(value["oid"])
                    if data is None:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']!r} was never uploaded")
                    files[value["path"]] = Blob(data, True)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                else:
                    raise HubError(400, f"unknown commit line {key!r}")
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, f"parent commit {parent} is not the head of {revision}")
            message = header.get("summary") or "Upload files"
            if header.get("description"):
                message += "\n\n" + header["description"]
            commit = self._new_commit(repo, revision, head.sha, message, files)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.sha}", "commitOid": commit.sha,
                "pullRequestUrl": None}

    def create_branch(self, repo_id: str, branch: str, body: dict, headers) -> dict:
        repo = self._repo(repo_id, self._authorized(headers, write=True))
        with self._lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = start.sha
        return {}

    def repo_info(self, repo_id: str, revision: str, headers) -> dict:
        repo = self._repo(repo_id, self._authorized(headers, write=False))
        commit = self._commit(repo, revision)
        info = {"id": repo.repo_id, "sha": commit.sha, "private": repo.private, "tags": [],
                "lastModified": commit.date, "siblings": [{"rfilename": path} for path in sorted(commit.files)]}
        return info | ({"sdk": repo.sdk} if repo.sdk else {"modelId": repo.repo_id})

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool, headers) -> list[dict]:
        repo = self._repo(repo_id, self._authorized(headers, write=False))
        commit = self._commit(repo, revision)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # every folder on the way, once
                folder = prefix + "/".join(parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append({"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if "/" in rest and not recursive:
                continue
            blob = commit.files[file_path]
            entry = {"type": "file", "path": file_path, "oid": blob.oid, "size": len(blob.content)}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content),
                                "pointerSize": len(lfs_pointer(blob.sha256, len(blob.content)))}
            entries.append(entry)
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound")
        return entries

    def resolve(self, repo_id: str, revision: str, path: str, headers) -> tuple[Commit, Blob]:
        repo = self._repo(repo_id, self._authorized(headers, write=False))
        commit = self._commit(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return commit, blob

    def take_failure(self, method: str, path: str) -> int | None:
        with self._lock:
            for i, (fail_method, pattern, status) in enumerate(self._failures):
                if fail_method == method and re.search(pattern, path):
                    del self._failures[i]
                    return status
        return None


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_API_MODEL = re.compile(rf"^/api/(?P<type>models|spaces)/{_REPO}(?:/(?P<op>revision|tree|preupload|commit|branch)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$")
_LFS_BATCH = re.compile(rf"^/(?P<type>spaces/)?{_REPO}\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/_lfs/(?P<oid>[0-9a-f]{64})(?P<verify>/verify)?$")
_RESOLVE = re.compile(rf"^/(?P<type>spaces/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _key(match: re.Match) -> str:
    """The key of :attr:`LoopbackHub.repos` a request path names: ``<id>`` for a model, ``spaces/<id>`` for a Space."""
    return f"spaces/{match['repo']}" if (match["type"] or "").startswith("spaces") else match["repo"]


def _make_handler(hub: LoopbackHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep pytest output clean
            pass

        # --------------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            hub.requests.append((self.command, self.path, status))

        def _json(self, status: int, payload, head: bool = False) -> None:
            self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, head)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            body = self._body() if self.command in ("POST", "PUT") else b""
            failure = hub.take_failure(self.command, path)
            if failure == -1:  # do the work, then lose the answer
                try:
                    self._route(path, query, body, respond=False)
                except HubError:
                    pass
                failure = 0
            if failure is not None:
                if failure == 0:
                    hub.requests.append((self.command, self.path, 0))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                return self._json(failure, {"error": "injected transient failure"})
            try:
                self._route(path, query, body)
            except HubError as err:
                headers = {"Content-Type": "application/json", "X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send(err.status, json.dumps({"error": err.message}).encode(), headers, self.command == "HEAD")

        def _route(self, path: str, query: dict, body: bytes, respond: bool = True) -> None:
            method, head = self.command, self.command == "HEAD"
            if not respond:  # the request is handled, its answer dropped by the caller
                self._json = self._send = lambda *args, **kwargs: None
            as_json = (lambda: json.loads(body or b"{}"))  # noqa: E731
            if method == "POST" and path == "/api/repos/create":
                status, payload = hub.create_repo(as_json(), self.headers)
                return self._json(status, payload)
            if method == "POST" and path == "/api/validate-yaml":
                return self._json(200, _validate_yaml(as_json().get("content", "")))
            if method == "GET" and path == "/api/whoami-v2":
                hub._authorized(self.headers, write=True)
                return self._json(200, {"type": "user", "name": USER, "auth": {"type": "access_token"}})
            if match := _API_MODEL.match(path):
                repo_id, op, rev, rest = _key(match), match["op"], match["rev"] or "main", match["rest"] or ""
                if method == "GET" and op in (None, "revision"):
                    return self._json(200, hub.repo_info(repo_id, rev, self.headers))
                if method == "GET" and op == "tree":
                    recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                    return self._json(200, hub.tree(repo_id, rev, rest, recursive, self.headers))
                if method == "POST" and op == "preupload":
                    return self._json(200, hub.preupload(repo_id, rev, as_json(), self.headers))
                if method == "POST" and op == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    return self._json(200, hub.commit(repo_id, rev, lines, self.headers))
                if method == "POST" and op == "branch":
                    return self._json(200, hub.create_branch(repo_id, rev, as_json(), self.headers))
            if method == "POST" and (match := _LFS_BATCH.match(path)):
                return self._json(200, hub.lfs_batch(_key(match), as_json(), self.headers))
            if match := _LFS_OBJECT.match(path):
                if method == "PUT" and not match["verify"]:
                    hub.lfs_put(match["oid"], body)
                    return self._send(200)
                if method == "POST" and match["verify"]:
                    return self._json(200, hub.lfs_verify(match["oid"], as_json()))
            if method in ("GET", "HEAD") and (match := _RESOLVE.match(path)):
                commit, blob = hub.resolve(_key(match), match["rev"], match["path"], self.headers)
                headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"',
                           "Content-Type": "application/octet-stream"}
                if blob.lfs:
                    headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))}
                return self._send(200, blob.content, headers, head)
            raise HubError(404, f"no such endpoint: {method} {path}")

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    return Handler


def _validate_yaml(content: str) -> dict:
    """Like the Hub: the README's YAML front matter must parse to a mapping."""
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
    if match is None:
        return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return {"errors": [{"message": f"invalid YAML: {err}"}], "warnings": []}
    if not isinstance(data, dict):
        return {"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []}
    return {"errors": [], "warnings": []}


def hub_environment(hub_url: str) -> dict[str, str]:
    """Environment for a child process that talks to the loopback Hub (online, no Xet, valid token)."""
    return {"HF_ENDPOINT": hub_url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": VALID_TOKEN,
            "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(name="hub")
def hub_fixture(monkeypatch):
    """A running :class:`LoopbackHub`; ``huggingface_hub`` in this process talks to it."""
    from huggingface_hub import constants, hf_api

    server = LoopbackHub().start()
    for key, value in hub_environment(server.url).items():
        monkeypatch.setenv(key, value)
    # huggingface_hub reads these once, at import time.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # behind huggingface_hub.create_repo & co.
    try:
        yield server
    finally:
        server.stop()
