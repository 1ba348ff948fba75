"""Child peer processes (`python -m peers.cli ...`): start, wait for a line, stop, always clean up.

Used by `swarm demo` and by the end-to-end tests.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


class PeerProcess:
    """A `python -m peers.cli ...` child whose output lines are collected by a thread."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Its own process group: a peer forks helpers (hivemind's DHT process, the p2p
        # daemon) that outlive a SIGKILL of the peer alone; we signal the whole group.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peers.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self.lines.append(line)
                self._queue.put(line)

    def wait_for_line(self, needle: str, timeout: float) -> str:
        """The first output line containing ``needle``; fails with the log tail after ``timeout``."""
        return self.wait_for(lambda line: needle in line, repr(needle), timeout)

    def wait_for(self, matches: Callable[[str], object], what: str, timeout: float) -> str:
        """The first output line for which ``matches`` is true; fails with the log tail after ``timeout``."""
        for line in list(self.lines):
            if matches(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process.poll() is not None and self._queue.empty()):
                raise AssertionError(
                    f"no line with {what} within {timeout}s from {self.args[:1]}:\n{self.tail()}"
                )
            try:
                line = self._queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if matches(line):
                return line

    def tail(self, count: int = 30) -> str:
        """The last ``count`` output lines, as printed (for failure messages)."""
        return "".join(self.lines[-count:])

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the peer and everything it started (as if its machine died)."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM the peer, wait for a clean exit, then reap its helpers; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)  # anything the peer left behind
        return code


class ProcessGroup:
    """Owns the processes a test starts; kills whatever is left at the end."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.processes: list[PeerProcess] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> PeerProcess:
        process = PeerProcess(args, self.log_dir / f"{name}.log", env)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            process.kill()
