"""A small HTTP endpoint for Prometheus: GET /metrics (text format 0.0.4) and GET /health
(200 while serving, else 503; the body is JSON: status, instances, instances_alive and
degraded, true when a lost instance took capacity away).

Runs on its own daemon thread (stdlib http.server); reads `ServerStats`, never the engine.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from loong.serve.server_stats import ServerStats


def health_body(stats: ServerStats, instances: int, ok: bool) -> dict:
    """The /health body (here and on the HTTP API's port)."""
    alive = sum(1 for g in stats.as_dict()["instances"] if g["alive"])
    return {"status": "SERVING" if ok else "NOT_SERVING", "instances": instances,
            "instances_alive": alive, "degraded": alive < instances}


def start_metrics_server(stats: ServerStats, host: str, port: int,
                         healthy: Callable[[], bool], instances: int = 1) -> ThreadingHTTPServer:
    """Serve until `.shutdown()`; `.server_address[1]` is the bound port (port 0 = any)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:   # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, stats.prometheus_text(), "text/plain; version=0.0.4")
            elif path == "/health":
                ok = healthy()
                body = health_body(stats, instances, ok)
                self._reply(200 if ok else 503, json.dumps(body) + "\n", "application/json")
            else:
                self._reply(404, "try /metrics or /health\n")

        def _reply(self, code: int, body: str, ctype: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:   # scrapes are not worth a log line
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="loong-metrics", daemon=True).start()
    return server
