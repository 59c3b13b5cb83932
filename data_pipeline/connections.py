"""The sockets behind `fetch`: a keep-alive pool per shard task and the deadline watchdog.

    with ConnectionPool() as pool:          # one per shard task, shared by its fetch threads
        fetch(url, opts, pool)

`ConnectionPool` never resolves a name or opens a connection: `fetch` asks it for an idle
connection to one of the addresses the network policy has just passed, and gives one back only in
a clean state. `Watchdog` shuts a socket down at its deadline, whatever read it is blocked in.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time


class ConnectionPool:
    """Idle keep-alive connections of one shard task, by (scheme, host, port, CA bundle).

    The pool never resolves a name: `take` hands out only a connection to one of the addresses the
    caller has just checked, so a reused connection is never a way around the network policy.
    Holds at most `max_idle` connections per host; one idle longer than `idle_s` is closed.
    """

    def __init__(self, max_idle: int = 32, idle_s: float = 15.0):
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.reused = 0  # requests sent on a reused connection
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[tuple[object, socket.socket, float]]] = {}
        self._closed = False

    def take(self, key: tuple, addresses: list) -> tuple[object, socket.socket] | None:
        now = time.monotonic()
        found, dropped = None, []
        with self._lock:
            entries = self._idle.get(key, [])
            while entries and found is None:
                ip, sock, since = entries.pop()
                if now - since <= self.idle_s and ip in addresses:
                    found = ip, sock
                    self.reused += 1
                else:
                    dropped.append(sock)
        for sock in dropped:
            sock.close()
        return found

    def give(self, key: tuple, ip: object, sock: socket.socket) -> None:
        with self._lock:
            entries = self._idle.setdefault(key, [])
            if not self._closed and len(entries) < self.max_idle:
                entries.append((ip, sock, time.monotonic()))
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = [sock for entries in self._idle.values() for _, sock, _ in entries]
            self._idle.clear()
        for sock in socks:
            sock.close()

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watchdog:
    """Shuts a socket down when its deadline passes, whatever read it is blocked in.

    Per-call socket timeouts restart on every byte; only a wall clock outside the reading
    thread bounds a slow drip. One thread serves every fetch of the process.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, int]] = []
        self._live: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, fd: int, deadline: float) -> int:
        with self._cond:
            token = next(self._tokens)
            heapq.heappush(self._heap, (deadline, token, fd))
            self._live.add(token)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fetch-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()
            return token

    def cancel(self, token: int) -> None:
        """Must run before the socket is closed: a shut-down fd is never one reused by now."""
        with self._cond:
            self._live.discard(token)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, fd = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(token)
                try:
                    with socket.socket(fileno=os.dup(fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer: nothing left to interrupt
