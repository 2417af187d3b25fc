"""The README's demo command works: real Envoy + extauthz + ratelimit + local JWKS, and its tour passes."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_tour_passes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshgate", "demo", "--tour-only"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) == 8  # 6 extauthz steps, the free-tier burst (429 + headers), premium unlimited
    assert all(line.startswith("PASS") for line in lines), done.stdout
    assert "retry-after:" in done.stdout and "ratelimit-policy:" in done.stdout  # the 429's headers are shown


def test_demo_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """Interactive demo: prints curl lines with a token; Ctrl-C (SIGINT) stops Envoy, extauthz and ratelimit cleanly."""
    log = tmp_path / "demo.out"
    with log.open("wb") as sink:
        demo = subprocess.Popen([sys.executable, "-m", "meshgate", "demo"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Try it" not in log.read_text() and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.1)
        text = log.read_text()
        assert "Try it" in text, text
        assert "curl -i http://127.0.0.1:" in text and "Authorization: Bearer ey" in text
        assert "for i in $(seq" in text  # the burst that ends in 429
        children = _children(demo.pid)
        assert len(children) >= 3, "demo runs extauthz, ratelimit and Envoy as child processes"
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"child {pid} left running"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
