"""A tiny local stand-in for the Hugging Face Hub: serves local folders on 127.0.0.1.

Routes huggingface_hub uses to download a repo (checked against huggingface_hub 2.4):

- ``GET /api/models/{repo}/revision/{rev}``: repo info with the commit ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}``: the file listing (``recursive`` is always honoured);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with ``ETag``, ``X-Repo-Commit`` and
  ``Content-Length``.

Loopback only, one request at a time, stopped by ``stop()`` or the context manager.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class LocalHub:
    """Serve ``repos`` (repo id -> local folder) like the Hub does, at ``self.endpoint``."""

    def __init__(self, repos: dict[str, str | Path]) -> None:
        self.repos = {repo: Path(folder) for repo, folder in repos.items()}
        # A stable fake commit per repo: the hash of its file names and sizes.
        self.commits = {repo: self._commit(folder) for repo, folder in self.repos.items()}
        self.requests: list[tuple[str, str]] = []
        self._server = HTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "LocalHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def _commit(self, folder: Path) -> str:
        digest = hashlib.sha1()
        for path in self._files(folder):
            digest.update(f"{path.relative_to(folder).as_posix()}:{path.stat().st_size}".encode())
        return digest.hexdigest()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _json(self, data: object, commit: str | None = None) -> None:
                payload = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.end_headers()
                self.wfile.write(payload)

            def _missing(self, what: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound" if what == "repo" else "EntryNotFound")
                self.send_header("X-Error-Message", f"{what} not found")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _split(self, parts: list[str], marker: str) -> tuple[str, str, str] | None:
                # {owner}/{name}/{marker}/{rev}/{rest...}, or {name}/{marker}/...
                if marker not in parts:
                    return None
                at = parts.index(marker)
                if at + 1 >= len(parts):
                    return None
                return "/".join(parts[:at]), parts[at + 1], "/".join(parts[at + 2 :])

            def _serve(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = [p for p in path.split("/") if p]
                if parts[:2] == ["api", "models"]:
                    for marker in ("revision", "tree"):
                        split = self._split(parts[2:], marker)
                        if split:
                            repo, _rev, _rest = split
                            if repo not in hub.repos:
                                return self._missing("repo")
                            folder, commit = hub.repos[repo], hub.commits[repo]
                            files = hub._files(folder)
                            if marker == "revision":
                                siblings = [{"rfilename": p.relative_to(folder).as_posix()} for p in files]
                                return self._json({"id": repo, "sha": commit, "siblings": siblings}, commit)
                            tree = [
                                {"type": "file", "path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                                 "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                                for p in files
                            ]
                            return self._json(tree, commit)
                    return self._missing("repo")
                split = self._split(parts, "resolve")
                if not split or split[0] not in hub.repos:
                    return self._missing("repo")
                repo, _rev, rest = split
                file = (hub.repos[repo] / rest).resolve()
                root = hub.repos[repo].resolve()
                if root not in file.parents or not file.is_file():  # no escaping the repo folder
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", hub.commits[repo])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = file.read_bytes()
                self.send_response(200)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", hub.commits[repo])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
