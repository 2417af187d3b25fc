"""identity (first success wins) -> policy -> response, with a deadline; fails closed and never raises.

``decide`` is synchronous so that a transport can answer without creating a task when nothing needs I/O (the common
case: cached keys, cached tokens). Only when a provider asks for I/O (an unknown JWT ``kid``) does ``check`` await.
Allow decisions are cached by exactly the request attributes that the providers and the rules read, never past the
identity's expiry (token ``exp``, API-key expiry) nor ``DECISION_TTL_S``; denials are always decided afresh.
A transport may also remember an allowed request by its own encoding of it, with its own encoded answer
(``remember_request``), and answer an identical one later without parsing it (``recall``), under the same expiry.
Such repeats are recorded (metrics, sampled audit) in batches, ``RECALL_RECORD_DELAY_S`` after the first one: on a
core shared with the processes that act on the answer (Envoy's upstream, the client), bookkeeping right after it
holds them up. Measured at 500 rps straight to the HTTP port, against recording each one at once: p50 7-21 us
lower in two A/B runs, CPU per request within noise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import NamedTuple, Protocol

from extauthz import response
from extauthz.config import ResponseSettings
from extauthz.identity.base import WITHDRAWALS, IdentityProvider, RefreshNeeded
from extauthz.model import AuthenticationError, CheckInput, Decision, Identity, Reason
from extauthz.policy_api import CompiledPolicy, Verdict

log = logging.getLogger(__name__)

ALLOW_MEMO_SIZE = 4096
DECISION_CACHE_SIZE = 10_000
REQUEST_CACHE_SIZE = 4096  # whole requests (about 1 KiB each with a JWT) remembered by a transport
# An allow whose key (the request attributes it was decided on) is longer than this is not cached: memory stays
# bounded by DECISION_CACHE_SIZE times this, whatever header values an authenticated client sends.
DECISION_KEY_MAX_CHARS = 8 * 1024
REQUEST_ID_HEADER = "x-request-id"
DECISION_TTL_S = 60.0  # an allow is re-derived at least this often, even for identities that never expire
RECALL_RECORD_DELAY_S = 0.05  # how late a repeated answer's decision may reach the metrics and the audit log


class DecisionObserver(Protocol):
    """Audit log and metrics: told about every decision with its latency.

    ``request_id`` is given when ``inp`` is the remembered input of an identical earlier request (``recall``):
    it is this request's id, to use instead of ``inp.request_id``.
    """

    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None: ...


# Identity lookups started for answers given meanwhile (see Pipeline._answer_meanwhile) at most at once.
MAX_BACKGROUND_REFRESHES = 256


class RememberedRequest(NamedTuple):
    """An allowed request a transport may answer again: its encoded answer, until when, and what it was."""

    answer: bytes
    valid_until: float
    inp: CheckInput
    decision: Decision
    withdrawals: int  # WITHDRAWALS.count when it was decided


class NullObserver:
    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None:
        return None


class Pipeline:
    def __init__(
        self,
        providers: Sequence[IdentityProvider],
        policy: CompiledPolicy,
        response_settings: ResponseSettings,
        *,
        observer: DecisionObserver | None = None,
        deadline_s: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.providers = tuple(providers)
        self.policy = policy
        self.response_settings = response_settings
        self.observer: DecisionObserver = observer or NullObserver()
        self.deadline_s = deadline_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._allow_memo: dict[tuple[int, str, Reason], Decision] = {}
        # Decision cache: an allow is a pure function of what the providers and rules read, until the identity
        # expires. Key = exactly those request attributes (raw header values; bounded, in memory only). A provider
        # or policy that does not declare what it reads turns the cache off: unknown inputs are never cached on.
        declared: list[frozenset[str] | None] = [getattr(p, "request_headers", None) for p in self.providers]
        declared.append(getattr(policy, "header_names", None))
        self._cache_enabled = all(names is not None for names in declared)
        self._key_headers = tuple(sorted({name for names in declared if names is not None for name in names}))
        self._key_query = any(getattr(provider, "reads_query", True) for provider in self.providers)
        self._decisions: dict[tuple[str | None, ...], tuple[Decision, float, int]] = {}
        # Whole requests a transport remembered: only sound when the request id cannot change the decision.
        self._remembers_requests = self._cache_enabled and REQUEST_ID_HEADER not in self._key_headers
        self._requests: dict[Hashable, RememberedRequest] = {}
        self._recalled: list[tuple[RememberedRequest, str, float]] = []  # answered, not recorded yet
        self._record_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()  # identity lookups started by _answer_meanwhile

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        for provider in self.providers:
            await provider.start()

    async def close(self) -> None:
        self.record_recalled()
        for task in list(self._background):
            task.cancel()
        for provider in self.providers:
            await provider.close()

    def unrecorded(self) -> Pipeline:
        """A pipeline deciding as this one does (its providers, rules and response settings) that records nothing:
        no decision metrics, no audit line. For dry runs (the admin API's ``/v1/check``). Its decision caches start
        empty, so it decides afresh; identity lookups it starts in the background are this pipeline's (cancelled
        when this one closes). Never start or close it: the providers are this pipeline's."""
        twin = Pipeline(
            self.providers,
            self.policy,
            self.response_settings,
            deadline_s=self.deadline_s,
            clock=self._clock,
            wall_clock=self._wall_clock,
        )
        twin._background = self._background
        return twin

    # -- decisions -------------------------------------------------------------------------------------------
    def _decide(self, inp: CheckInput) -> Decision:
        identity: Identity | None = None
        auth_error: AuthenticationError | None = None
        refused: list[str] = []  # headers of refused credentials that were meshgate's to check
        for provider in self.providers:
            try:
                identity = provider.authenticate(inp)
            except RefreshNeeded as needed:
                verdict = self.policy.without_identity(inp)
                if verdict is None:
                    raise
                return self._answer_meanwhile(inp, verdict, needed)
            except AuthenticationError as error:
                if auth_error is None or auth_error.foreign:
                    auth_error = error
                if error.credential_header:
                    refused.append(error.credential_header)
                continue
            if identity is not None:
                break
        decision = self._verdict(inp, self.policy.evaluate(inp, identity, auth_error), identity)
        if identity is None and refused and decision.allowed:  # a public route: the refused credentials stay here
            for header in refused:
                decision = self._stripped(decision, header)
        return decision

    def _stripped(self, decision: Decision, header: str) -> Decision:
        """``decision`` that also removes ``header`` (a credential) before the upstream, when the policy says so."""
        if not self.response_settings.strip_credentials or header in decision.headers_to_remove:
            return decision
        return replace(decision, headers_to_remove=(*decision.headers_to_remove, header))

    def _answer_meanwhile(self, inp: CheckInput, verdict: Verdict, needed: RefreshNeeded) -> Decision:
        """A public route (or a deny that needs no identity) is answered without waiting for the identity: a token
        sent along must not make it wait for, or fail with, an identity provider. The lookup runs in the background
        and this answer is not reused, so the next request gets the identity headers and metadata. The credential
        is stripped all the same."""
        self._refresh_in_background(needed)
        decision = self._verdict(inp, verdict, None)
        if decision.allowed and needed.credential_header:
            decision = self._stripped(decision, needed.credential_header)
        return replace(decision, reusable=False)

    def _refresh_in_background(self, needed: RefreshNeeded) -> None:
        if len(self._background) >= MAX_BACKGROUND_REFRESHES:  # a flood of new tokens: later requests ask again
            return

        async def refresh() -> None:
            try:
                await asyncio.wait_for(needed.refresh(), self.deadline_s)
            except TimeoutError:  # slow lookups go on in their providers; nothing to say per request
                return
            except Exception as error:  # the providers log their own failures: one line, no traceback
                log.debug("background identity refresh failed: %s", type(error).__name__)

        try:
            task = asyncio.get_running_loop().create_task(refresh())
        except RuntimeError:  # no running loop (a synchronous caller): the next request asks again
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _verdict(self, inp: CheckInput, verdict: Verdict, identity: Identity | None) -> Decision:
        if verdict.allowed:
            return self._allow(identity, verdict.rule, verdict.reason)
        return response.deny(
            inp,
            verdict.status,
            verdict.reason,
            verdict.message,
            self.response_settings,
            identity=identity,
            rule=verdict.rule,
        )

    def _allow(self, identity: Identity | None, rule: str, reason: Reason) -> Decision:
        """The allow decision, reused while the same identity object (e.g. a token-cache hit) meets the same rule.

        Keyed by the identity's id and checked by ``is``, so a recycled id can never return another identity's
        answer; the transports key their encoded answers on the decision object in turn.
        """
        key = (id(identity), rule, reason)
        cached = self._allow_memo.get(key)
        if cached is not None and cached.identity is identity:
            return cached
        decision = response.allow(identity, rule, reason, self.response_settings)
        if len(self._allow_memo) >= ALLOW_MEMO_SIZE:
            self._allow_memo.clear()  # cheaper than LRU bookkeeping on every call; refills from hot identities
        self._allow_memo[key] = decision
        return decision

    def fail_closed(self, inp: CheckInput, reason: Reason, message: str) -> Decision:
        return response.deny(inp, 503 if reason is Reason.TIMEOUT else 500, reason, message, self.response_settings)

    def decide(self, inp: CheckInput) -> Decision:
        """Answer now, or raise ``RefreshNeeded`` when the answer needs I/O. Never raises anything else."""
        started = self._clock()
        try:
            key = self._cache_key(inp) if self._cache_enabled else None
            cached = self._decisions.get(key) if key is not None else None
            if cached is not None and cached[1] > self._wall_clock() and cached[2] == WITHDRAWALS.count:
                decision = cached[0]
            else:
                decision = self._decide(inp)
                if key is not None and decision.allowed and decision.reusable:
                    self._remember(key, decision)
        except RefreshNeeded:
            raise
        except Exception:
            log.exception("extauthz decision failed; denying")
            decision = self.fail_closed(inp, Reason.INTERNAL_ERROR, "internal error")
        self.observer.record(inp, decision, self._clock() - started)
        return decision

    def _cache_key(self, inp: CheckInput) -> tuple[str | None, ...]:
        headers = inp.headers
        return (
            inp.method,
            inp.host,
            inp.path,
            inp.source_principal,
            inp.query if self._key_query else None,
            *[headers.get(name) for name in self._key_headers],
        )

    def _valid_until(self, decision: Decision) -> float:
        """How long an allow may be reused: never past its identity's expiry (a token's ``exp``)."""
        until = self._wall_clock() + DECISION_TTL_S
        if decision.identity is not None:
            until = min(until, decision.identity.expires_at)
        return until

    def _remember(self, key: tuple[str | None, ...], decision: Decision) -> None:
        if sum(len(part) for part in key if part) > DECISION_KEY_MAX_CHARS:
            return
        if len(self._decisions) >= DECISION_CACHE_SIZE:
            self._decisions.clear()  # cheaper than LRU bookkeeping per call; hot requests come back at once
        self._decisions[key] = (decision, self._valid_until(decision), WITHDRAWALS.count)

    def remember_request(self, key: Hashable, inp: CheckInput, decision: Decision, answer: bytes) -> None:
        """Let a transport answer this request again with ``answer`` without parsing it (allows only).

        ``key`` is the transport's encoding of every part of the request that ``inp`` was parsed from, except the
        request id: two requests with equal keys must parse to equal inputs apart from ``request_id``.
        """
        if not (self._remembers_requests and decision.allowed and decision.reusable):
            return
        if len(self._requests) >= REQUEST_CACHE_SIZE:
            self._requests.clear()
        self._requests[key] = RememberedRequest(answer, self._valid_until(decision), inp, decision, WITHDRAWALS.count)

    def recall(self, key: Hashable) -> RememberedRequest | None:
        """The request remembered under ``key`` while its allow is valid. The transport answers with its
        ``answer`` and then calls ``record_recall`` (the answer goes out first)."""
        entry = self._requests.get(key)
        if entry is not None and not self.still_valid(entry):
            del self._requests[key]
            return None
        return entry

    def still_valid(self, entry: RememberedRequest) -> bool:
        """Whether ``entry``, which ``recall`` gave earlier, may still answer its request: its allow has not run
        out and no credential was withdrawn since (a rotated-out signing key stops its tokens at once)."""
        return entry.valid_until > self._wall_clock() and entry.withdrawals == WITHDRAWALS.count

    def record_recall(self, entry: RememberedRequest, request_id: str, elapsed_s: float) -> None:
        """Record a recalled answer as this request's decision, with the next batch (``record_recalled``)."""
        self._recalled.append((entry, request_id, elapsed_s))
        if self._record_timer is None:
            self._record_timer = asyncio.get_running_loop().call_later(RECALL_RECORD_DELAY_S, self.record_recalled)

    def record_recalled(self) -> None:
        """Record the recalled answers not recorded yet. Never raises: they were answered already."""
        if self._record_timer is not None:
            self._record_timer.cancel()
            self._record_timer = None
        recalled, self._recalled = self._recalled, []
        record = self.observer.record
        for entry, request_id, elapsed_s in recalled:
            try:
                record(entry.inp, entry.decision, elapsed_s, request_id)
            except Exception:
                log.exception("recording a remembered decision failed")

    async def check(self, inp: CheckInput) -> Decision:
        """Answer, awaiting a key refresh if one is needed, within the deadline. Never raises."""
        try:
            return self.decide(inp)
        except RefreshNeeded as needed:
            return await self.check_after_refresh(inp, needed)

    async def check_after_refresh(self, inp: CheckInput, needed: RefreshNeeded) -> Decision:
        """Finish a ``decide`` that raised ``RefreshNeeded``: await the refresh, then decide once more."""
        started = self._clock()
        try:
            async with asyncio.timeout(self.deadline_s):
                await needed.refresh()
        except TimeoutError:
            decision = self.fail_closed(inp, Reason.TIMEOUT, "identity provider did not answer in time")
            self.observer.record(inp, decision, self._clock() - started)
            return decision
        except Exception:
            log.warning("identity refresh failed", exc_info=True)
        try:
            return self.decide(inp)
        except RefreshNeeded as still:
            decision = response.deny(inp, still.status, still.reason, still.message, self.response_settings)
            self.observer.record(inp, decision, self._clock() - started)
            return decision
