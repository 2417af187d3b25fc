"""extauthz.app.ExtauthzService: what a reload does to the pipeline it replaces."""

from __future__ import annotations

from pathlib import Path

from extauthz.app import ExtauthzService
from extauthz.model import CheckInput, Decision

POLICY = """
rules:
  - name: health
    public: true
    match: {methods: [GET], paths: [/healthz]}
"""


class Recorder:
    def __init__(self) -> None:
        self.request_ids: list[str | None] = []

    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None:
        self.request_ids.append(request_id)


async def test_a_reload_records_the_repeats_the_replaced_pipeline_answered(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    service = ExtauthzService(policy, deadline_s=1.0, reload_interval_s=3600.0)
    await service.start()
    try:
        old = service.pipeline()
        recorder = Recorder()
        old.observer = recorder
        inp = CheckInput(method="GET", host="api.example", path="/healthz", query="", headers={}, request_id="a")
        decision = old.decide(inp)
        assert decision.allowed
        old.remember_request(b"GET /healthz", inp, decision, b"answer")
        entry = old.recall(b"GET /healthz")
        assert entry is not None
        old.record_recall(entry, "b", 0.000_001)
        assert recorder.request_ids == [None]  # the repeat waits for its batch
        policy.write_text(POLICY + "# changed\n")
        assert await service.watcher.check_now()
        assert service.pipeline() is not old
        assert recorder.request_ids == [None, "b"]  # recorded at the swap, not left to a timer
    finally:
        await service.close()
