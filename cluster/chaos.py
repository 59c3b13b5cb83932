"""Fault injection for `megaclass simulate --chaos`: SIGKILL one matching process, once.

Ray names the process that runs a task or actor after it (`ray::<task>`, `ray::<Actor>...`),
so a worker is found by its command line in /proc, the way an operator would find it with `ps`,
but only among the descendants of the stage the simulation started: a local Ray's raylet and its
workers are children of that command, and nobody else's process on the host can match.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process ended while we looked
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(root_pid: int) -> set[int]:
    """Every live process below `root_pid` in the process tree (not `root_pid` itself)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_pid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def find_processes(pattern: str, root_pid: int) -> list[tuple[int, str]]:
    """[(pid, command line)] of live descendants of `root_pid` whose command line contains `pattern`."""
    found = []
    for pid in descendants(root_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # the process ended while we looked
            continue
        if pattern in cmdline:
            found.append((pid, cmdline))
    return sorted(found)


class ProcessKiller:
    """Watches for a process matching `pattern` and SIGKILLs the first one, once.

    It fires `after_s` seconds after `start()` and, when `after_path_glob` is given, only once a
    file matching it exists (for training: once a run checkpoint has been written).
    """

    def __init__(self, pattern: str, *, root_pid: int | None = None, after_s: float = 0.0, after_path_glob: tuple[Path, str] | None = None,
                 poll_s: float = 0.2):
        self.pattern = pattern
        self.root_pid = root_pid  # whose descendants may be killed; set by start() when not given
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
            for pid, cmdline in find_processes(self.pattern, self.root_pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.killed.append({"pid": pid, "process": cmdline[:80], "at_s": round(time.monotonic() - started, 1)})
                return

    def start(self, root_pid: int | None = None) -> None:
        """Watch the descendants of `root_pid` (the stage's process)."""
        self.root_pid = root_pid if root_pid is not None else self.root_pid
        if self.root_pid is None:
            raise ValueError("ProcessKiller needs the pid of the process whose descendants it may kill")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"pattern": self.pattern, "killed": self.killed}
