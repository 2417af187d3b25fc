"""bench.profile micro runs every step on the real bench request (a few calls each: a smoke test, no timing)."""

from __future__ import annotations

from bench.profile import _micro


async def test_micro_measures_every_step() -> None:
    steps = dict(await _micro(3))
    assert "http: one request through the connection, parsed" in steps
    assert "http: one request through the connection, remembered" in steps
    assert "ratelimit: ShouldRateLimit whole" in steps
    assert all(us > 0 for us in steps.values())
