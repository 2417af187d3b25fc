"""Subprocesses for tests and the bench: start, wait for a log line or a port, stop with bounded waits.

Output (stdout + stderr merged) goes to a file, never a pipe nobody reads, so a chatty process cannot block.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from tests.support.ports import wait_for_port


class ProcessError(RuntimeError):
    """The process exited early or did not show the expected sign of life in time."""


class Proc:
    """One managed subprocess; use as a context manager or call stop()."""

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str = "",
    ) -> None:
        self.name = name or Path(cmd[0]).name
        taskset = shutil.which("taskset") if cpu is not None else None
        self.cmd = [taskset, "-c", str(cpu), *cmd] if taskset else list(cmd)
        self.pinned = bool(taskset)
        fd, log_name = tempfile.mkstemp(prefix=f"meshgate-{self.name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_name)
        self._log: IO[bytes] = self.log_path.open("wb")
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().strip().splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def wait_for_line(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the output has a line matching the regex; return the match (groups for ports etc.)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                found = regex.search(line)
                if found:
                    return found
            self._check_alive()
            time.sleep(0.05)
        raise ProcessError(f"{self.name}: no line matching {pattern!r} after {timeout:.0f} s:\n{self.tail()}")

    def wait_for_port(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                wait_for_port(port, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise ProcessError(
                        f"{self.name}: port {port} not open after {timeout:.0f} s:\n{self.tail()}"
                    ) from None

    def wait(self, timeout: float) -> int:
        """Wait for a normal exit; ProcessError (after killing it) when it takes longer than ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(timeout=1.0)
            raise ProcessError(f"{self.name} still running after {timeout:.0f} s:\n{self.tail()}") from None

    def stop(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM), SIGKILL after ``timeout``; return the exit code. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)

    def cleanup(self) -> None:
        """Stop and delete the log file."""
        self.stop()
        self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def start(
    cmd: Sequence[str],
    *,
    ready_line: str | None = None,
    ready_port: int | None = None,
    timeout: float = 10.0,
    cpu: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    name: str = "",
) -> Proc:
    """Start ``cmd`` and wait for ``ready_line`` (regex) and/or ``ready_port``; stopped again on failure."""
    proc = Proc(cmd, cpu=cpu, env=env, cwd=cwd, name=name)
    try:
        if ready_line is not None:
            proc.wait_for_line(ready_line, timeout=timeout)
        if ready_port is not None:
            proc.wait_for_port(ready_port, timeout=timeout)
    except BaseException:
        proc.cleanup()
        raise
    return proc
