"""The one way a service serves Prometheus metrics: its own registry, on loopback unless told otherwise.

Each service's metrics class subclasses :class:`MetricsEndpoint`. A registry per process object (not the
library's global one) lets tests build several services in one interpreter without sharing series.
prometheus-client is imported here only to build the registry and the server; message schemas stay free of it.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["MetricsEndpoint"]


class MetricsEndpoint:
    """A CollectorRegistry with serve()/close(); subclasses register their series on ``self.registry``."""

    log_name = "metrics"

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on addr:port (port 0 picks a free one); returns the bound port."""
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        bound = int(self._server.server_address[1])
        logging.getLogger(self.log_name).info("metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
