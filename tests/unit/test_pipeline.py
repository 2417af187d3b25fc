"""The pipeline's own logic, with tiny in-test providers and policy (the real ones have their own tests)."""

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from extauthz.config import ResponseSettings
from extauthz.identity.base import RefreshNeeded
from extauthz.model import AuthenticationError, CheckInput, Decision, Identity, IdentityKind, Reason
from extauthz.pipeline import MAX_BACKGROUND_REFRESHES, RECALL_RECORD_DELAY_S, Pipeline
from extauthz.policy_api import Verdict

INP = CheckInput(method="GET", host="h", path="/p", headers={"x-user": "alice"}, request_id="r1")


class HeaderProvider:
    """Identity from x-user; 'bad' is a rejected credential; 'boom' a bug."""

    kind = IdentityKind.API_KEY

    def __init__(self) -> None:
        self.started = self.closed = 0

    def authenticate(self, inp: CheckInput) -> Identity | None:
        user = inp.headers.get("x-user")
        if user is None:
            return None
        if user == "bad":
            raise AuthenticationError(Reason.INVALID_API_KEY, "bad key")
        if user == "boom":
            raise RuntimeError("bug")
        return Identity(kind=self.kind, subject=user)

    async def start(self) -> None:
        self.started += 1

    async def close(self) -> None:
        self.closed += 1


class RefreshingProvider:
    """Needs a refresh before it knows 'late'; refresh behaviour is set per test."""

    kind = IdentityKind.JWT

    def __init__(self, refresh: Callable[[], Awaitable[None]], learns: bool = True) -> None:
        self.known = False
        self._refresh = refresh
        self.learns = learns

    def authenticate(self, inp: CheckInput) -> Identity | None:
        if inp.headers.get("x-late") is None:
            return None
        if not self.known:
            raise RefreshNeeded(self._do_refresh)
        return Identity(kind=self.kind, subject="late")

    async def _do_refresh(self) -> None:
        await self._refresh()
        self.known = self.learns

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class Policy:
    """Allow any identity; 401 without; 403 for 'mallory'."""

    def without_identity(self, inp: CheckInput) -> Verdict | None:
        return None

    def evaluate(self, inp: CheckInput, identity: Identity | None, auth_error: AuthenticationError | None) -> Verdict:
        if identity is None:
            if auth_error is not None:
                return Verdict(False, 401, auth_error.reason, message=auth_error.message)
            return Verdict(False, 401, Reason.MISSING_CREDENTIAL, message="authentication required")
        if identity.subject == "mallory":
            return Verdict(False, 403, Reason.FORBIDDEN, rule="r", message="forbidden")
        return Verdict(True, 200, Reason.ALLOWED, rule="r")


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[Decision, float]] = []
        self.request_ids: list[str] = []

    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None:
        self.seen.append((decision, elapsed_s))
        self.request_ids.append(inp.request_id if request_id is None else request_id)


def make(*providers: object, deadline_s: float = 1.0) -> tuple[Pipeline, Recorder]:
    recorder = Recorder()
    ticks = iter(range(1000))
    pipeline = Pipeline(
        providers,  # type: ignore[arg-type]
        Policy(),
        ResponseSettings(),
        observer=recorder,
        deadline_s=deadline_s,
        clock=lambda: float(next(ticks)),
    )
    return pipeline, recorder


def with_headers(**headers: str) -> CheckInput:
    return CheckInput(method="GET", host="h", path="/p", headers=headers, request_id="r1")


def test_first_success_wins_and_is_recorded() -> None:
    pipeline, recorder = make(HeaderProvider())
    decision = pipeline.decide(INP)
    assert decision.allowed and decision.identity is not None and decision.identity.subject == "alice"
    assert recorder.seen == [(decision, 1.0)]


def test_rejected_credential_reason_reaches_the_401() -> None:
    pipeline, _ = make(HeaderProvider())
    decision = pipeline.decide(with_headers(**{"x-user": "bad"}))
    assert (decision.status, decision.reason) == (401, Reason.INVALID_API_KEY)


def test_no_credential_is_401_missing_and_policy_refusal_is_403() -> None:
    pipeline, _ = make(HeaderProvider())
    assert pipeline.decide(with_headers()).reason is Reason.MISSING_CREDENTIAL
    assert pipeline.decide(with_headers(**{"x-user": "mallory"})).status == 403


def test_a_bug_fails_closed_without_raising() -> None:
    pipeline, recorder = make(HeaderProvider())
    decision = pipeline.decide(with_headers(**{"x-user": "boom"}))
    assert not decision.allowed and (decision.status, decision.reason) == (500, Reason.INTERNAL_ERROR)
    assert recorder.seen[0][0] is decision


async def test_refresh_then_answer() -> None:
    calls = 0

    async def refresh() -> None:
        nonlocal calls
        calls += 1

    pipeline, _ = make(RefreshingProvider(refresh))
    with pytest.raises(RefreshNeeded):
        pipeline.decide(with_headers(**{"x-late": "1"}))
    decision = await pipeline.check(with_headers(**{"x-late": "1"}))
    assert decision.allowed and calls == 1


async def test_still_unknown_after_refresh_is_401_unknown_key() -> None:
    async def refresh() -> None:
        return None

    pipeline, recorder = make(RefreshingProvider(refresh, learns=False))
    decision = await pipeline.check(with_headers(**{"x-late": "1"}))
    assert (decision.status, decision.reason) == (401, Reason.UNKNOWN_KEY)
    assert recorder.seen[-1][0] is decision


async def test_refresh_past_the_deadline_fails_closed() -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    pipeline, _ = make(RefreshingProvider(slow), deadline_s=0.01)
    decision = await pipeline.check(with_headers(**{"x-late": "1"}))
    assert (decision.status, decision.reason) == (503, Reason.TIMEOUT)


async def test_failing_refresh_is_logged_then_decided() -> None:
    async def broken() -> None:
        raise OSError("issuer down")

    pipeline, _ = make(RefreshingProvider(broken, learns=False))
    decision = await pipeline.check(with_headers(**{"x-late": "1"}))
    assert decision.reason is Reason.UNKNOWN_KEY


async def test_lifecycle_reaches_providers() -> None:
    provider = HeaderProvider()
    pipeline, _ = make(provider)
    await pipeline.start()
    await pipeline.close()
    assert (provider.started, provider.closed) == (1, 1)
    assert (await pipeline.check(INP)).allowed


class SameIdentityProvider:
    """Returns one identity object per user, as the JWT token cache does on a hit."""

    kind = IdentityKind.JWT

    def __init__(self) -> None:
        self.identities = {name: Identity(kind=self.kind, subject=name) for name in ("alice", "bob")}

    def authenticate(self, inp: CheckInput) -> Identity | None:
        return self.identities.get(inp.headers.get("x-user", ""))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def test_allow_decisions_are_reused_per_identity_object_and_rule() -> None:
    pipeline, _ = make(SameIdentityProvider())
    first = pipeline.decide(with_headers(**{"x-user": "alice"}))
    again = pipeline.decide(CheckInput(method="POST", host="h", path="/q", headers={"x-user": "alice"}))
    other = pipeline.decide(with_headers(**{"x-user": "bob"}))
    assert first is again  # same identity object, same rule: the same answer, not rebuilt
    assert other is not first and other.identity is not None and other.identity.subject == "bob"
    assert first.request_id == ""  # request-specific data never sits in a reused decision


def test_allow_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extauthz.pipeline.ALLOW_MEMO_SIZE", 2)
    pipeline, _ = make(HeaderProvider())
    for name in ("a", "b", "c", "d"):
        assert pipeline.decide(with_headers(**{"x-user": name})).allowed
    assert len(pipeline._allow_memo) <= 2


class DeclaredProvider:
    """Identity from x-user (declared, as real providers declare what they read); expiry from x-exp."""

    kind = IdentityKind.API_KEY
    request_headers = frozenset({"x-user"})
    reads_query = False

    def __init__(self) -> None:
        self.calls = 0
        self.expires_at = 1_000.0

    def authenticate(self, inp: CheckInput) -> Identity | None:
        self.calls += 1
        user = inp.headers.get("x-user")
        if user is None:
            return None
        return Identity(kind=self.kind, subject=user, expires_at=self.expires_at)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class DeclaredPolicy(Policy):
    header_names = frozenset({"x-tenant"})


def cached_pipeline(now: list[float]) -> tuple[Pipeline, DeclaredProvider, Recorder]:
    provider = DeclaredProvider()
    recorder = Recorder()
    pipeline = Pipeline(
        [provider],  # type: ignore[list-item]
        DeclaredPolicy(),
        ResponseSettings(),
        observer=recorder,
        wall_clock=lambda: now[0],
    )
    return pipeline, provider, recorder


def request(user: str | None = "alice", **extra: str) -> CheckInput:
    headers = {"x-user": user, **extra} if user is not None else dict(extra)
    return CheckInput(method="GET", host="h", path="/p", headers=headers, request_id=extra.get("x-request-id", ""))


def test_allow_is_answered_from_the_decision_cache_keyed_by_what_is_read() -> None:
    now = [100.0]
    pipeline, provider, recorder = cached_pipeline(now)
    first = pipeline.decide(request(**{"x-request-id": "a"}))
    again = pipeline.decide(request(**{"x-request-id": "b", "user-agent": "other"}))  # unread headers differ
    assert again is first and provider.calls == 1
    assert len(recorder.seen) == 2  # every answer is still observed (metrics, audit)
    pipeline.decide(request("bob"))  # a read header differs: decided afresh
    pipeline.decide(request(**{"x-tenant": "t2"}))  # a header a rule reads differs: decided afresh
    pipeline.decide(CheckInput(method="POST", host="h", path="/p", headers={"x-user": "alice"}))
    assert provider.calls == 4


def test_cached_allow_ends_with_the_identity() -> None:
    now = [100.0]
    pipeline, provider, _ = cached_pipeline(now)
    provider.expires_at = 130.0  # sooner than the cache's own TTL
    pipeline.decide(request())
    now[0] = 129.0
    pipeline.decide(request())
    assert provider.calls == 1
    now[0] = 130.0  # the identity's expiry: never answered from the cache at or past it
    pipeline.decide(request())
    assert provider.calls == 2


def test_cached_allow_is_refreshed_after_the_ttl_even_without_expiry() -> None:
    now = [100.0]
    pipeline, provider, _ = cached_pipeline(now)
    provider.expires_at = float("inf")
    pipeline.decide(request())
    now[0] += 59.0
    pipeline.decide(request())
    assert provider.calls == 1
    now[0] += 2.0
    pipeline.decide(request())
    assert provider.calls == 2


def test_denials_are_never_cached() -> None:
    now = [100.0]
    pipeline, provider, _ = cached_pipeline(now)
    assert pipeline.decide(request(None)).status == 401
    assert pipeline.decide(request(None)).status == 401
    assert provider.calls == 2


def test_decision_cache_is_off_when_a_provider_does_not_declare_its_inputs() -> None:
    provider = HeaderProvider()  # declares nothing
    pipeline = Pipeline([provider], Policy(), ResponseSettings())  # type: ignore[list-item]
    pipeline.decide(INP)
    pipeline.decide(INP)
    assert pipeline._decisions == {}


def test_decision_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extauthz.pipeline.DECISION_CACHE_SIZE", 2)
    now = [100.0]
    pipeline, _, _ = cached_pipeline(now)
    for user in ("a", "b", "c", "d"):
        pipeline.decide(request(user))
    assert len(pipeline._decisions) <= 2


# -- whole requests remembered by a transport --------------------------------------------------------------------
async def test_a_remembered_request_is_recalled_with_its_answer_and_recorded_under_its_own_id() -> None:
    now = [100.0]
    pipeline, provider, recorder = cached_pipeline(now)
    inp = request(**{"x-request-id": "a"})
    decision = pipeline.decide(inp)
    pipeline.remember_request(b"GET /p alice", inp, decision, b"answer bytes")
    entry = pipeline.recall(b"GET /p alice")
    assert entry is not None and (entry.answer, entry.decision, entry.inp) == (b"answer bytes", decision, inp)
    assert provider.calls == 1 and recorder.request_ids == ["a"]  # recalling decides nothing and records nothing
    pipeline.record_recall(entry, "b", 0.000_002)
    pipeline.record_recall(entry, "c", 0.000_002)
    assert recorder.request_ids == ["a"]  # recorded in a batch, a little later
    await asyncio.sleep(RECALL_RECORD_DELAY_S * 2)
    assert recorder.request_ids == ["a", "b", "c"]  # observed like any decision, each with its own request id
    assert pipeline.recall(b"GET /p bob") is None  # never remembered
    pipeline.record_recall(entry, "d", 0.000_002)
    await pipeline.close()  # a pipeline that stops records what it still holds
    assert recorder.request_ids == ["a", "b", "c", "d"]


def test_a_remembered_request_ends_with_its_identity() -> None:
    now = [100.0]
    pipeline, provider, _ = cached_pipeline(now)
    provider.expires_at = 130.0
    inp = request()
    pipeline.remember_request("k", inp, pipeline.decide(inp), b"")
    now[0] = 129.0
    assert pipeline.recall("k") is not None
    now[0] = 130.0  # the token's exp: parsed and decided afresh from here on
    assert pipeline.recall("k") is None
    assert pipeline._requests == {}


def test_denials_and_undeclared_inputs_are_never_remembered() -> None:
    now = [100.0]
    pipeline, _, _ = cached_pipeline(now)
    denied = request(None)
    pipeline.remember_request("denied", denied, pipeline.decide(denied), b"")
    undeclared = Pipeline([HeaderProvider()], Policy(), ResponseSettings())  # type: ignore[list-item]
    undeclared.remember_request("k", INP, undeclared.decide(INP), b"")
    assert pipeline._requests == {} and undeclared._requests == {}


def test_requests_are_not_remembered_when_a_rule_reads_the_request_id() -> None:
    class ReadsRequestId(Policy):
        header_names = frozenset({"x-request-id"})

    pipeline = Pipeline([DeclaredProvider()], ReadsRequestId(), ResponseSettings())  # type: ignore[list-item]
    inp = request(**{"x-request-id": "a"})
    pipeline.remember_request("k", inp, pipeline.decide(inp), b"")
    assert pipeline.recall("k") is None


async def test_a_failing_observer_does_not_undo_a_recalled_answer(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    pipeline, _, recorder = cached_pipeline(now)
    inp = request()
    pipeline.remember_request("k", inp, pipeline.decide(inp), b"")

    def broken(*args: object) -> None:
        raise RuntimeError("audit sink down")

    recorder.record = broken  # type: ignore[method-assign]
    entry = pipeline.recall("k")
    assert entry is not None
    pipeline.record_recall(entry, "r", 0.0)
    pipeline.record_recall(entry, "s", 0.0)
    pipeline.record_recalled()  # does not raise, and tries every one: the answers went out already
    assert caplog.text.count("recording a remembered decision failed") == 2


def test_remembered_requests_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extauthz.pipeline.REQUEST_CACHE_SIZE", 2)
    now = [100.0]
    pipeline, _, _ = cached_pipeline(now)
    for user in ("a", "b", "c", "d"):
        inp = request(user)
        pipeline.remember_request(user, inp, pipeline.decide(inp), b"")
    assert len(pipeline._requests) <= 2


def test_allows_decided_on_oversized_attributes_are_not_cached() -> None:
    now = [100.0]
    pipeline, provider, _ = cached_pipeline(now)
    huge = request(**{"x-tenant": "t" * 9000})  # a header the policy reads, far longer than any real one
    assert pipeline.decide(huge).allowed and pipeline.decide(huge).allowed
    assert provider.calls == 2 and pipeline._decisions == {}
    pipeline.decide(request())
    pipeline.decide(request())
    assert provider.calls == 3  # normal requests are still cached


class PublicPolicy(Policy):
    """Every route is public whoever calls."""

    def without_identity(self, inp: CheckInput) -> Verdict | None:
        return Verdict(True, 200, Reason.PUBLIC, rule="open")


async def test_answers_given_meanwhile_start_a_bounded_number_of_lookups() -> None:
    """A flood of requests on a public route, each with a token that needs a lookup, is answered at once; the
    lookups started in the background are capped, so the flood cannot pile up tasks."""
    gate = asyncio.Event()

    async def blocked() -> None:
        await gate.wait()

    pipeline = Pipeline(
        [RefreshingProvider(blocked)],  # type: ignore[list-item]
        PublicPolicy(),
        ResponseSettings(),
        deadline_s=5.0,
    )
    for n in range(MAX_BACKGROUND_REFRESHES + 50):
        decision = pipeline.decide(with_headers(**{"x-late": str(n)}))
        assert (decision.status, decision.reason, decision.reusable) == (200, Reason.PUBLIC, False)
    assert len(pipeline._background) == MAX_BACKGROUND_REFRESHES
    gate.set()
    await pipeline.close()
