"""The README's demo command works: real Envoy + extauthz + local JWKS, and its tour passes."""

import subprocess
import sys

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
    assert len(lines) == 6
    assert all(line.startswith("PASS") for line in lines), done.stdout
