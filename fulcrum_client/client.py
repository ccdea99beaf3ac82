"""A small client for the registry's serving endpoint (GET /api/serve/<name>/).

Caching rules, per (prompt, label) or (prompt, version):

* within `ttl` seconds of the last answer from the server, the cached copy is returned without a request;
* after that, the client revalidates with If-None-Match: a 304 renews the copy, a 200 replaces it;
* a 404 or 410 (the prompt, label or version is gone) drops the copy at once: the caller's fallback is returned
  if it gave one, else PromptNotFound is raised; a gone prompt is never served from the cache;
* when the server cannot be reached (connection error, time-out, 5xx), the last good copy is returned and a
  warning says so; without one, the fallback; without that, ServerUnavailable;
* any other 4xx (a bad token, a bad label name) raises ClientError: configuration errors are not hidden.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger("fulcrum_client")

DEFAULT_LABEL = "production"


class ClientError(Exception):
    """The server refused the request (bad token, no permission, bad input)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PromptNotFound(ClientError, LookupError):
    """The prompt, label or version does not exist (404) or was deleted (410)."""


class ServerUnavailable(ClientError):
    """The server could not be reached and there was no cached copy and no fallback."""


@dataclass(frozen=True)
class Prompt:
    """A prompt version as served. `source` says where this copy came from: server (a fresh 200), revalidated
    (a 304 confirmed the cached copy), cache (within the TTL, no request), stale (server unreachable, last good
    copy) or fallback (the caller's own)."""

    name: str
    template: str
    label: str | None = None
    version: int | None = None
    content_hash: str = ""
    system_message: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    source: str = "server"


@dataclass
class _Entry:
    prompt: Prompt
    etag: str
    fetched_at: float


Fallback = str | Mapping[str, Any] | Prompt | None


class FulcrumClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        ttl: float = 60.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[tuple[str, str, str], _Entry] = {}
        self._lock = threading.Lock()

    # --- public ---------------------------------------------------------------------------------------------

    def get_prompt(
        self, name: str, label: str = DEFAULT_LABEL, *, version: int | None = None, fallback: Fallback = None
    ) -> Prompt:
        """The prompt `name` by label (default production) or by version number; see the module's rules."""
        key = (name, "version", str(version)) if version is not None else (name, "label", label)
        with self._lock:
            entry = self._cache.get(key)
        now = self._clock()
        if entry is not None and now - entry.fetched_at < self.ttl:
            return replace(entry.prompt, source="cache")
        query = {"version": str(version)} if version is not None else {"label": label}
        url = f"{self.base_url}/api/serve/{urllib.parse.quote(name, safe='')}/?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if entry is not None:
            headers["If-None-Match"] = entry.etag
        what = f"{name}@v{version}" if version is not None else f"{name}:{label}"
        try:
            status, etag, body = self._get(url, headers)
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return self._unreachable(key, what, entry, fallback, f"server unreachable: {reason}")
        if status == 304 and entry is not None:
            with self._lock:
                entry.fetched_at = self._clock()
            return replace(entry.prompt, source="revalidated")
        if status == 200:
            prompt = self._parse(body, label if version is None else None)
            with self._lock:
                self._cache[key] = _Entry(prompt, etag or f'"{prompt.content_hash}"', self._clock())
            return prompt
        if status in (404, 410):
            with self._lock:
                dropped = self._cache.pop(key, None)
            message = self._message(body) or f"{what} not found"
            if dropped is not None:
                log.warning("fulcrum: %s is gone (%s %s); dropped the cached copy", what, status, message)
            if fallback is not None:
                log.warning("fulcrum: using the fallback prompt for %s: %s", what, message)
                return self._fallback(name, label, fallback)
            raise PromptNotFound(message, status)
        if status >= 500:
            return self._unreachable(key, what, entry, fallback, f"server error {status}")
        raise ClientError(self._message(body) or f"HTTP {status} for {what}", status)

    def invalidate(self, name: str | None = None) -> None:
        """Forget cached copies: of one prompt, or of all."""
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                for key in [k for k in self._cache if k[0] == name]:
                    del self._cache[key]

    # --- helpers ---------------------------------------------------------------------------------------------

    def _get(self, url: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (http(s) only)
                return response.status, response.headers.get("ETag", ""), response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, exc.headers.get("ETag", "") if exc.headers else "", exc.read() or b""

    def _unreachable(
        self, key: tuple[str, str, str], what: str, entry: _Entry | None, fallback: Fallback, reason: str
    ) -> Prompt:
        if entry is not None:
            age = self._clock() - entry.fetched_at
            log.warning(
                "fulcrum: serving the last good copy of %s (v%s, fetched %.0f s ago): %s",
                what,
                entry.prompt.version,
                age,
                reason,
            )
            return replace(entry.prompt, source="stale")
        if fallback is not None:
            log.warning("fulcrum: using the fallback prompt for %s: %s", what, reason)
            return self._fallback(key[0], key[2] if key[1] == "label" else None, fallback)
        raise ServerUnavailable(f"cannot fetch {what}: {reason}")

    @staticmethod
    def _parse(body: bytes, label: str | None) -> Prompt:
        data = json.loads(body)
        return Prompt(
            name=data["prompt"],
            template=data["template"],
            label=data.get("label", label),
            version=data["version"],
            content_hash=data["content_hash"],
            system_message=data.get("system_message", ""),
            examples=list(data.get("examples") or []),
            variables=list(data.get("variables") or []),
            params=dict(data.get("params") or {}),
            source="server",
        )

    @staticmethod
    def _message(body: bytes) -> str:
        try:
            return str(json.loads(body).get("message", ""))
        except (ValueError, AttributeError):
            return ""

    @staticmethod
    def _fallback(name: str, label: str | None, fallback: Fallback) -> Prompt:
        if isinstance(fallback, Prompt):
            return replace(fallback, source="fallback")
        if isinstance(fallback, str):
            return Prompt(name=name, template=fallback, label=label, source="fallback")
        assert fallback is not None
        fields = {k: v for k, v in fallback.items() if k in Prompt.__dataclass_fields__ and k != "source"}
        fields.setdefault("name", name)
        fields.setdefault("label", label)
        return Prompt(**fields, source="fallback")
