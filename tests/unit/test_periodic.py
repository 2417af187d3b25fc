import asyncio

import pytest

from meshgate.periodic import Periodic


async def test_ticks_until_closed_and_survives_a_failing_tick(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0
    ticked = asyncio.Event()

    async def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first tick fails")
        ticked.set()

    periodic = Periodic(tick, 0.001, "test-periodic")
    periodic.start()
    periodic.start()  # idempotent: still one task
    await asyncio.wait_for(ticked.wait(), 5)
    assert periodic.running
    await periodic.close()
    assert not periodic.running
    seen = calls
    await asyncio.sleep(0.01)
    assert calls == seen  # closed: no more ticks
    assert "test-periodic failed" in caplog.text
    await periodic.close()  # closing twice is harmless


def test_interval_must_be_positive() -> None:
    async def tick() -> None:
        return None

    with pytest.raises(ValueError, match="positive"):
        Periodic(tick, 0, "x")
