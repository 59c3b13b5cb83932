"""Fault injection for `megaclass simulate --chaos`: SIGKILL one matching process, once.

Ray names the process that runs a task or actor after it (`ray::<task>`, `ray::<Actor>...`),
so a worker is found by its command line in /proc, the way an operator would find it with `ps`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def find_processes(pattern: str) -> list[tuple[int, str]]:
    """[(pid, command line)] of live processes whose command line contains `pattern`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended while we looked
            continue
        if pattern in cmdline:
            found.append((int(entry.name), cmdline))
    return sorted(found)


class ProcessKiller:
    """Watches for a process matching `pattern` and SIGKILLs the first one, once.

    It fires `after_s` seconds after `start()` and, when `after_path_glob` is given, only once a
    file matching it exists (for training: once a run checkpoint has been written).
    """

    def __init__(self, pattern: str, *, after_s: float = 0.0, after_path_glob: tuple[Path, str] | None = None,
                 poll_s: float = 0.2):
        self.pattern = pattern
        self.after_s = after_s
        self.after_path_glob = after_path_glob
        self.poll_s = poll_s
        self.killed: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _ready(self, started: float) -> bool:
        if time.monotonic() - started < self.after_s:
            return False
        if self.after_path_glob is not None:
            folder, pattern = self.after_path_glob
            return folder.exists() and any(folder.glob(pattern))
        return True

    def _watch(self) -> None:
        started = time.monotonic()
        while not self._stop.wait(self.poll_s):
            if not self._ready(started):
                continue
            for pid, cmdline in find_processes(self.pattern):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append({"pid": pid, "process": cmdline[:80], "at_s": round(time.monotonic() - started, 1)})
                return

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"pattern": self.pattern, "killed": self.killed}
