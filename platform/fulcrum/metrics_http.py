"""A small HTTP endpoint for processes that are not the web server (a worker, beat).

/metrics   the process group's merged samples (Prometheus text format)
/healthz   liveness: 200 while the process answers at all
/readyz    readiness: 200 once the process is ready (a worker consuming, beat scheduling), else 503
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry

from . import metrics

log = logging.getLogger(__name__)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class Health:
    def __init__(self) -> None:
        self.ready = False
        self.detail = "starting"

    def set(self, ready: bool, detail: str) -> None:
        self.ready, self.detail = ready, detail


def make_app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body, content_type = metrics.render(registry)
            start_response("200 OK", [("Content-Type", content_type)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"alive\n"]
        if path == "/readyz":
            status = "200 OK" if health.ready else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [f"{health.detail}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics, /healthz or /readyz\n"]

    return app


def serve(port: int, health: Health, registry: CollectorRegistry | None = None, addr: str = "0.0.0.0") -> _Server:
    """Serve in a daemon thread; returns the server (its port is server.server_port, useful with port 0)."""
    server = make_server(
        addr, port, make_app(registry or metrics.registry(), health), server_class=_Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="fulcrum-metrics-http", daemon=True)
    thread.start()
    return server
