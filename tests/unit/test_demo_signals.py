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
    def running_demo(say: Callable[[str], None], envoy_bin: Path | None = None) -> Iterator[object]:
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
