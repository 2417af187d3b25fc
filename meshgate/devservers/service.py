"""Run ``meshgate serve ...`` as a child process, the way operators run it, for the demo, e2e tests and bench."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


class ServiceProcess:
    """``with ServiceProcess(["extauthz", "--config", p]) as svc: svc.ports["grpc_port"]``.

    Ports default to 0 (free ports); the real ones come from the service's ``listening`` log line.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cpu: int | None = None,
        start_timeout: float = 30.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.env = env
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="meshgate-svc-")
        self.log_file = Path(self._tmp.name) / "service.log"

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("service not started")
        return self._proc

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "meshgate", "serve", *self.args]
        for flag in ("--grpc-port", "--http-port", "--admin-port"):
            if flag not in command:
                command += [flag, "0"]
        if self.cpu is not None:
            command = ["taskset", "-c", str(self.cpu), *command]
        return command

    def start(self) -> ServiceProcess:
        with self.log_file.open("wb") as sink:
            self._proc = subprocess.Popen(self.command(), stdout=sink, stderr=subprocess.STDOUT, env=self.env)
        self.ports = self._wait_listening()
        return self

    def log_records(self) -> list[dict[str, object]]:
        records = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def _wait_listening(self) -> dict[str, int]:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshgate exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            for record in self.log_records():
                if record.get("msg") == "listening":
                    return {k: int(v) for k, v in record.items() if k.endswith("_port") and isinstance(v, int)}
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"meshgate did not start listening in {self.start_timeout}s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), then kill if it lingers. Returns the exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._proc.returncode

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
