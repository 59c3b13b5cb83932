"""A loopback HTTP server for ingestion tests and benchmarks (127.0.0.1, a free port).

    with LoopbackServer() as server:
        server.add("/a.jpg", jpeg_bytes)                         # 200 with these bytes
        server.add("/slow.jpg", jpeg_bytes, delay_s=2.0)          # headers after a delay (timeouts)
        server.add("/old.jpg", status=301, location="/a.jpg")     # redirect (relative or absolute)
        server.add("/noai.jpg", jpeg_bytes, headers={"X-Robots-Tag": "noai"})
        server.add("/endless", endless=True)                       # streams zeros forever
        server.add("/flaky.jpg", jpeg_bytes, fail_first=2)        # 503 twice, then 200
        server.url("/a.jpg")                                       # http://127.0.0.1:PORT/a.jpg

Unregistered paths answer 404; `status=500` etc. answer that status. `server.hits[path]` counts
requests, `server.connections` accepted connections. `LoopbackServer(ssl_context=ctx)` serves
HTTPS; `LoopbackServer(keep_alive=True)` keeps connections open between requests as web servers
do (`hang_up=True` on a route: close after its response without saying so, like an idle timeout). Reused by bench/ingest.py (import it
with `tests/` on sys.path) and simulations.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=dict)
    location: str | None = None
    delay_s: float = 0.0          # before the status line
    endless: bool = False         # stream zeros until the client hangs up
    content_type: str = "image/jpeg"
    fail_first: int = 0           # answer `fail_status` to the first N requests
    fail_status: int = 503
    hang_up: bool = False         # keep-alive server: close after this response without a Connection header


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as web servers do: a keep-alive response is not held back

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.hits[path] += 1
        route = self.server.routes.get(path)
        if route is None:
            route = Route(b"not found", status=404, content_type="text/plain")
        if route.delay_s:
            time.sleep(route.delay_s)
        if self.server.hits[path] <= route.fail_first:
            route = Route(b"try later", status=route.fail_status, headers=route.headers, content_type="text/plain")
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        if route.location:
            self.send_header("Location", route.location)
        for name, value in route.headers.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                self.send_header(name, item)
        if not self.server.keep_alive:
            self.send_header("Connection", "close")
        if route.endless or route.hang_up:
            self.close_connection = True
        if route.endless:
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                while not self.server.stopping.is_set():
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return
            return
        self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        try:
            self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            return


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:  # failed TLS handshakes are test cases here
        return

    def __init__(self, ssl_context=None, keep_alive: bool = False):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.keep_alive = keep_alive
        self.connections = 0
        self.lock = threading.Lock()
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        self.routes: dict[str, Route] = {}
        self.hits: Counter = Counter()
        self.stopping = threading.Event()


class LoopbackServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving registered payloads; a context manager."""

    def __init__(self, ssl_context=None, keep_alive: bool = False):
        self._server = _Server(ssl_context, keep_alive)
        self.ssl_context = ssl_context
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def hits(self) -> Counter:
        return self._server.hits

    @property
    def connections(self) -> int:
        return self._server.connections

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes = b"", **kwargs) -> str:
        """Register a route (see `Route` for options); returns its URL."""
        self._server.routes[path] = Route(body, **kwargs)
        return self.url(path)

    def start(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stopping.set()
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which must have started
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
