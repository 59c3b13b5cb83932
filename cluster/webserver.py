"""A static file server on 127.0.0.1 for the local simulation (stands in for the web)."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _QuietHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as web servers answer
    disable_nagle_algorithm = True  # ... and without holding a response back for an ACK

    def log_message(self, format: str, *args) -> None:  # one line per image would drown the demo output
        return


class StaticServer:
    """Serves `root` over HTTP on a free loopback port for the life of a `with` block."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1"):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "StaticServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
