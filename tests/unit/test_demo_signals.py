"""meshgate demo: a signal while the demo stops its children after a failure does not cut the stopping short."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshgate import demo


def test_a_signal_during_the_stop_after_a_tour_error_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[str] = []

    @contextmanager
    def running_demo(
        say: Callable[[str], None], envoy_bin: Path | None = None, on_stopping: Callable[[], None] = lambda: None
    ) -> Iterator[object]:
        try:
            yield object()
        finally:  # stopping a child; SIGTERM arrives meanwhile (an impatient Ctrl-C, a supervisor's TERM)
            steps.append("stop begun")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            steps.append("stop finished")

    def broken_tour(_demo: object, _say: Callable[[str], None]) -> bool:
        raise ConnectionResetError("envoy went away")

    monkeypatch.setattr(demo, "_envoy_or_why_not", lambda: (Path("/bin/true"), ""))
    monkeypatch.setattr(demo, "running_demo", running_demo)
    monkeypatch.setattr(demo, "run_tour", broken_tour)
    with pytest.raises(ConnectionResetError):  # the tour's own error, not a swallowed interrupt and exit 0
        demo.run_demo(say=lambda _: None)
    assert steps == ["stop begun", "stop finished"]


def test_a_signal_during_the_stop_after_envoy_refused_to_start_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Envoy refuses its config; while the services that did start are stopped, SIGTERM arrives: both stops still
    finish and the demo reports Envoy's error (before, the signal cut the first stop short)."""
    steps: list[str] = []

    class Service:
        ports = {"grpc_port": 1, "http_port": 2, "admin_port": 3}

        def __init__(self, argv: list[str], env: object = None) -> None:
            self.name = argv[0]

        def start(self) -> Service:
            return self

        def close(self) -> None:
            steps.append(f"{self.name} stop begun")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            steps.append(f"{self.name} stop finished")

    class RefusingEnvoy:
        def __init__(self, binary: Path | None = None) -> None:
            pass

        def start(self, _config: str) -> None:
            raise demo.EnvoyError("envoy: invalid config")

        def stop(self) -> None:
            steps.append("envoy stopped")

    monkeypatch.setattr(demo, "_envoy_or_why_not", lambda: (Path("/bin/true"), ""))
    monkeypatch.setattr(demo, "ServiceProcess", Service)
    monkeypatch.setattr(demo, "EnvoyProcess", RefusingEnvoy)
    assert demo.run_demo(say=lambda _: None) == 1
    assert steps == [
        "envoy stopped",
        "ratelimit stop begun",
        "ratelimit stop finished",
        "extauthz stop begun",
        "extauthz stop finished",
    ]
