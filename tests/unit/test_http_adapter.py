"""The HTTP ext_authz adapter over real sockets: allow/deny, keep-alive, pipelining, bad input, limits, drain."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from extauthz.config import ResponseSettings
from extauthz.http_adapter import (
    HttpListener,
    RequestKey,
    RequestShape,
    encode_decision,
    request_id_in_shape,
    request_key,
    request_shape,
    start_http_listener,
)
from extauthz.model import AuthenticationError, CheckInput, Decision, Identity, IdentityKind, Reason
from extauthz.pipeline import DECISION_TTL_S, Pipeline, RememberedRequest
from extauthz.policy_api import Verdict
from tests.unit.test_grpc_adapter import FakePolicy, FakeProvider, make_pipeline


class GatedProvider(FakeProvider):
    """``refresh`` waits for the test to open the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def _refresh(self) -> None:
        await self.gate.wait()
        self.refreshed = True


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict[str, dict[str, str]]:
        return json.loads(self.body)  # type: ignore[no-any-return]


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode("utf-8").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head else await asyncio.wait_for(reader.readexactly(length), 10)
    return Response(status, headers, body)


def request(path: str = "/x", *, method: str = "GET", extra: str = "", host: str = "api.example") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


class Harness:
    def __init__(self, listener: HttpListener, provider: GatedProvider) -> None:
        self.listener = listener
        self.provider = provider
        self.pipeline: Pipeline = Pipeline([provider], FakePolicy(), ResponseSettings())

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.listener.port)

    async def exchange(self, payload: bytes, *, head: bool = False) -> Response:
        reader, writer = await self.connect()
        writer.write(payload)
        try:
            return await read_response(reader, head=head)
        finally:
            writer.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    provider = GatedProvider()
    holder: dict[str, Harness] = {}
    listener = await start_http_listener(
        "127.0.0.1", 0, lambda: holder["h"].pipeline, path_prefix="/authz/", max_body_bytes=1024
    )
    holder["h"] = Harness(listener, provider)
    yield holder["h"]
    await listener.stop(1.0)


async def test_trailers_of_a_chunked_body_are_no_headers(harness: Harness) -> None:
    """A credential sent only as a trailer is not a credential (Envoy sends none; other clients might)."""
    chunked = (
        b"POST /x HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nAuthorization: Bearer good-alice\r\n\r\n"
    )
    answer = await harness.exchange(chunked)
    assert answer.status == 401
    assert "authorization" not in harness.provider.seen[-1].headers


async def test_allow_answers_identity_headers_and_metadata(harness: Harness) -> None:
    answer = await harness.exchange(
        request("/x?token=t", extra="Authorization: Bearer good-alice\r\nX-Request-Id: r-1\r\n")
    )
    assert answer.status == 200
    assert answer.headers["content-length"] == "0"
    assert answer.headers["x-auth-subject"] == "alice"
    assert answer.headers["x-auth-tier"] == "gold"
    assert "authorization" in answer.headers["x-envoy-auth-headers-to-remove"].split(",")
    assert answer.headers["x-meshgate-md-sub"] == "alice"
    assert answer.headers["x-meshgate-md-tier"] == "gold"
    seen = harness.provider.seen[-1]
    assert (seen.method, seen.host, seen.path, seen.query) == ("GET", "api.example", "/x", "token=t")
    assert seen.request_id == "r-1"


async def test_deny_answers_status_headers_and_json_body(harness: Harness) -> None:
    answer = await harness.exchange(request(extra="X-Request-Id: r-2\r\n"))
    assert answer.status == 401
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-meshgate-reason"] == "missing_credential"
    assert answer.headers["www-authenticate"].startswith("Bearer realm=")
    assert answer.json()["error"]["request_id"] == "r-2"
    forbidden = await harness.exchange(request("/admin", extra="Authorization: Bearer good-bob\r\n"))
    assert forbidden.status == 403
    assert forbidden.json()["error"]["code"] == "forbidden"


async def test_head_denial_has_no_body(harness: Harness) -> None:
    reader, writer = await harness.connect()
    writer.write(request(method="HEAD") + request("/public"))
    denied = await read_response(reader, head=True)
    assert denied.status == 401
    assert int(denied.headers["content-length"]) > 0
    assert (await read_response(reader)).status == 200  # the next answer starts right after the head
    writer.close()


async def test_keep_alive_serves_many_requests_on_one_connection(harness: Harness) -> None:
    reader, writer = await harness.connect()
    for index in range(5):
        writer.write(request(f"/public?i={index}"))
        answer = await read_response(reader)
        assert answer.status == 200
        assert "connection" not in answer.headers
    writer.close()
    assert len(harness.provider.seen) == 5


async def test_pipelined_answers_keep_request_order_across_refresh(harness: Harness) -> None:
    reader, writer = await harness.connect()
    writer.write(
        request("/a", extra="Authorization: Bearer refresh\r\n")
        + request("/b", extra="Authorization: Bearer good-carol\r\n")
        + request("/c")
        + b"garbage\r\n\r\n"
    )
    await asyncio.sleep(0)
    harness.provider.gate.set()
    first, second, third, fourth = [await read_response(reader) for _ in range(4)]
    assert (first.status, first.headers["x-auth-subject"]) == (200, "refresh")
    assert (second.status, second.headers["x-auth-subject"]) == (200, "carol")
    assert third.status == 401
    assert fourth.status == 400
    assert fourth.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_malformed_request_gets_400_and_close(harness: Harness) -> None:
    for payload in (b"garbage\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n"):
        reader, writer = await harness.connect()
        writer.write(payload)
        answer = await read_response(reader)
        assert answer.status == 400
        assert answer.json()["error"]["code"] == "bad_request"
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_huge_headers_get_431(harness: Harness) -> None:
    many = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(700))
    answer = await harness.exchange(request(extra=many))
    assert answer.status == 431
    # One header line that never ends, sent in pieces: bounded as well.
    reader, writer = await harness.connect()
    writer.write(b"GET / HTTP/1.1\r\nX-Long: ")
    answering = asyncio.create_task(read_response(reader))
    for _ in range(100):  # bounded; stop sending once the server answered
        if answering.done():
            break
        writer.write(b"v" * 8192)
        await writer.drain()
        for _ in range(3):
            await asyncio.sleep(0)
    assert (await answering).status == 431
    writer.close()
    long_url = await harness.exchange(request("/" + "a" * 70_000))
    assert long_url.status == 431


async def test_body_is_ignored_but_bounded(harness: Harness) -> None:
    small = await harness.exchange(request("/public", method="POST", extra="Content-Length: 5\r\n") + b"hello")
    assert small.status == 200
    big = await harness.exchange(request("/public", method="POST", extra="Content-Length: 4096\r\n") + b"x" * 4096)
    assert big.status == 413


async def test_connection_close_and_http10_close_after_answer(harness: Harness) -> None:
    for payload in (request("/public", extra="Connection: close\r\n"), b"GET /public HTTP/1.0\r\n\r\n"):
        reader, writer = await harness.connect()
        writer.write(payload)
        answer = await read_response(reader)
        assert answer.status == 200
        assert answer.headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_bytes_after_a_closing_request_are_dropped_quietly(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The parser refuses what follows a request that closes the connection: that answer is owed, nothing more."""
    after_close = request("/public", extra="Connection: close\r\n") + b"GET /public HTTP/1.1\r\n\r\n"
    for payload in (after_close, b"GET /public HTTP/1.0\r\n\r\nX"):
        reader, writer = await harness.connect()
        writer.write(payload)
        answer = await read_response(reader)
        assert (answer.status, answer.headers["connection"]) == (200, "close")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # no 400 after it
        writer.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_path_prefix_is_stripped(harness: Harness) -> None:
    await harness.exchange(request("/authz/admin?x=1", extra="Authorization: Bearer good-a-admin\r\n"))
    assert (harness.provider.seen[-1].path, harness.provider.seen[-1].query) == ("/admin", "x=1")
    await harness.exchange(request("/authz", extra="Authorization: Bearer good-a\r\n"))
    assert harness.provider.seen[-1].path == "/"
    await harness.exchange(request("/authzother", extra="Authorization: Bearer good-a\r\n"))
    assert harness.provider.seen[-1].path == "/authzother"


async def test_forward_auth_takes_the_original_request(harness: Harness) -> None:
    answer = await harness.exchange(
        request(
            "/forward-auth",
            extra=(
                "X-Forwarded-Method: post\r\nX-Forwarded-Uri: /admin/x?y=2\r\n"
                "X-Forwarded-Host: shop.example\r\nAuthorization: Bearer good-dan\r\n"
            ),
        )
    )
    assert answer.status == 403
    seen = harness.provider.seen[-1]
    assert (seen.method, seen.host, seen.path, seen.query) == ("POST", "shop.example", "/admin/x", "y=2")
    # Without the forwarded headers the path is taken as is.
    await harness.exchange(request("/forward-auth"))
    assert harness.provider.seen[-1].path == "/forward-auth"


async def test_absolute_form_and_xfcc_are_kept(harness: Harness) -> None:
    xfcc = "By=spiffe://td/ns/a/sa/srv;URI=spiffe://td/ns/b/sa/cli"
    await harness.exchange(request("http://api.example/p?q=1", extra=f"X-Forwarded-Client-Cert: {xfcc}\r\n"))
    seen = harness.provider.seen[-1]
    assert (seen.path, seen.query) == ("/p", "q=1")
    assert seen.headers["x-forwarded-client-cert"] == xfcc
    assert seen.source_principal == ""


async def test_identity_values_cannot_split_headers(harness: Harness) -> None:
    answer = await harness.exchange(request(extra="Authorization: Bearer good-eve\tx-evil: 1\r\n"))
    assert answer.status == 200
    assert "x-evil" not in answer.headers
    assert answer.headers["x-auth-subject"] == "evex-evil: 1"


async def test_upgrade_is_answered_then_closed(harness: Harness) -> None:
    reader, writer = await harness.connect()
    writer.write(request("/public", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
    assert (await read_response(reader)).status == 200
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_broken_pipeline_fails_closed(harness: Harness) -> None:
    class Broken(Pipeline):
        def decide(self, inp: CheckInput) -> Decision:
            raise RuntimeError("bug")

    harness.pipeline = Broken([harness.provider], FakePolicy(), ResponseSettings())
    answer = await harness.exchange(request())
    assert answer.status == 500
    assert answer.json()["error"]["code"] == "internal_error"


async def test_missing_pipeline_answers_500_and_closes() -> None:
    def no_pipeline() -> Pipeline:
        raise LookupError("not loaded")

    server = (await start_http_listener("127.0.0.1", 0, no_pipeline)).server
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(request())
        assert (await read_response(reader)).status == 500
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        server.close()


async def test_graceful_stop_finishes_in_flight_and_closes_idle() -> None:
    provider = GatedProvider()
    pipeline = Pipeline([provider], FakePolicy(), ResponseSettings())
    listener = await start_http_listener("127.0.0.1", 0, lambda: pipeline)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    idle_writer.write(request("/public"))
    assert (await read_response(idle_reader)).status == 200
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    busy_writer.write(request(extra="Authorization: Bearer refresh\r\n"))
    for _ in range(100):  # bounded: until the request reached the refresh
        if len(provider.seen) >= 2:
            break
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(listener.stop(10.0))
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""
    idle_writer.close()
    provider.gate.set()
    answer = await read_response(busy_reader)
    assert answer.status == 200
    assert answer.headers["connection"] == "close"
    assert await asyncio.wait_for(busy_reader.read(), 10) == b""
    busy_writer.close()
    await asyncio.wait_for(stopping, 10)
    assert not listener.server.is_serving()


def test_encode_decision_allow_and_unknown_status() -> None:
    identity = Identity(kind=IdentityKind.JWT, subject="ü")
    allow = encode_decision(
        Decision(
            allowed=True,
            status=200,
            reason=Reason.ALLOWED,
            identity=identity,
            headers_to_set=(("x-auth-subject", "ü\r\n"),),
            metadata={"sub": "ü"},
        ),
        close=True,
    )
    assert allow.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n")
    assert b"x-auth-subject: \xc3\xbc\r\n" in allow
    assert b"x-meshgate-md-sub: \xc3\xbc\r\n" in allow
    assert allow.endswith(b"connection: close\r\n\r\n")
    odd = encode_decision(Decision(allowed=False, status=599, reason=Reason.TIMEOUT, body=b"{}"))
    assert odd.startswith(b"HTTP/1.1 599 Unknown\r\ncontent-length: 2\r\n")
    assert odd.endswith(b"\r\n\r\n{}")


async def test_half_closed_peer_still_gets_the_answer_owed(harness: Harness) -> None:
    reader, writer = await harness.connect()
    writer.write(request(extra="Authorization: Bearer refresh\r\n"))
    writer.write_eof()
    for _ in range(100):  # bounded: until the server saw the request
        if harness.provider.seen:
            break
        await asyncio.sleep(0.01)
    harness.provider.gate.set()
    assert (await read_response(reader)).status == 200
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_peer_leaving_mid_refresh_does_not_break_the_server(harness: Harness) -> None:
    _reader, writer = await harness.connect()
    writer.write(request(extra="Authorization: Bearer refresh\r\n"))
    for _ in range(100):
        if harness.provider.seen:
            break
        await asyncio.sleep(0.01)
    writer.transport.abort()
    harness.provider.gate.set()
    answer = await harness.exchange(request("/public"))
    assert answer.status == 200


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test here runs on both loops: production serves on uvloop, whose transports differ."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


async def test_allow_bytes_are_encoded_once_per_decision() -> None:
    from extauthz import response
    from extauthz.http_adapter import _Context

    ctx = _Context(make_pipeline, "", "/forward-auth", 1024, 1024)
    allow = response.allow(Identity(kind=IdentityKind.JWT, subject="a"), "r", Reason.ALLOWED, ResponseSettings())
    first = ctx.encode(allow, head=False, close=False)
    assert ctx.encode(allow, head=True, close=False) is first
    assert ctx.encode(allow, head=False, close=True).endswith(b"connection: close\r\n\r\n")


# -- identical requests answered without parsing ------------------------------------------------------------------
class DeclaredProvider(GatedProvider):
    """Declares what it reads, as the real providers do, so the pipeline may remember whole requests."""

    request_headers = frozenset({"authorization"})
    reads_query = True


class DeclaredPolicy(FakePolicy):
    header_names: frozenset[str] = frozenset()


class IdRecorder:
    """(request id, recalled?) of every decision the pipeline records."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def record(self, inp: CheckInput, decision: Decision, elapsed_s: float, request_id: str | None = None) -> None:
        self.seen.append((inp.request_id if request_id is None else request_id, request_id is not None))


class Remembering:
    def __init__(self, listener: HttpListener, provider: DeclaredProvider) -> None:
        self.listener = listener
        self.provider = provider
        self.recorder = IdRecorder()
        self.pipeline = Pipeline([provider], DeclaredPolicy(), ResponseSettings(), observer=self.recorder)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.listener.port)


@pytest.fixture
async def remembering() -> AsyncIterator[Remembering]:
    holder: dict[str, Remembering] = {}
    listener = await start_http_listener("127.0.0.1", 0, lambda: holder["h"].pipeline)
    holder["h"] = Remembering(listener, DeclaredProvider())
    yield holder["h"]
    await listener.stop(1.0)


def envoy_request(request_id: str, path: str = "/x", token: str = "good-alice", extra: str = "") -> bytes:  # noqa: S107
    """As Envoy sends it: lower-case names, the request id among the headers."""
    return (
        f"GET {path} HTTP/1.1\r\nhost: api.example\r\ncontent-length: 0\r\nx-request-id: {request_id}\r\n"
        f"authorization: Bearer {token}\r\n{extra}x-envoy-expected-rq-timeout-ms: 1000\r\n\r\n"
    ).encode()


def count_request_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The reads whose key the connection built: a read answered by its shape is not among them."""
    built: list[bytes] = []

    def counting(data: bytes) -> RequestKey | None:
        built.append(data)
        return request_key(data)

    monkeypatch.setattr("extauthz.http_adapter.request_key", counting)
    return built


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> Response:
    writer.write(payload)
    return await read_response(reader)


def test_request_key_takes_out_the_lower_case_request_id_line_only() -> None:
    key = request_key(envoy_request("r-1"))
    assert key is not None and key.request_id == "r-1"
    assert key.key == request_key(envoy_request("r-2")).key  # type: ignore[union-attr]
    assert b"r-1" not in key.key and b"authorization: Bearer good-alice\r\n" in key.key
    assert envoy_request("r-1")[key.id_start : key.id_end] == b"r-1"
    whole = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert request_key(whole) == RequestKey(whole, "", -1, -1)
    assert request_key(b"GET / HTTP/1.1\r\nhost: a\r\n") is None  # header section not complete
    body = b"POST / HTTP/1.1\r\ncontent-length: 20\r\n\r\n\r\nx-request-id: r-9\r\n"
    assert request_key(body) == RequestKey(body, "")  # only the header section is searched
    ends_in_blank_line = b"POST / HTTP/1.1\r\ncontent-length: 21\r\n\r\n\r\nx-request-id: r-9\r\n\r\n"
    assert request_key(ends_in_blank_line) == RequestKey(ends_in_blank_line, "")
    # An id the parser may refuse (a control character), or a folded line after it, stays in the key: such a
    # request is parsed, and never matches a remembered one.
    for odd in (envoy_request("r-\x001"), envoy_request("r-1").replace(b"\r\nauthorization", b"\r\n authorization")):
        assert request_key(odd) == RequestKey(odd, "")
    blanks = request_key(envoy_request(" \t r-1 \t"))
    assert blanks is not None and blanks.request_id == "r-1" and blanks.key == key.key


def _shape_of(data: bytes) -> RequestShape:
    key = request_key(data)
    assert key is not None
    entry = RememberedRequest(b"answer", 0.0, None, None, 0)  # type: ignore[arg-type]  # only compared
    shape = request_shape(data, key, entry, None)  # type: ignore[arg-type]
    assert shape is not None
    return shape


def test_a_read_of_the_same_shape_has_the_same_key_and_its_own_id() -> None:
    shape = _shape_of(envoy_request("0b5a7a3c-4a4e"))
    assert request_id_in_shape(envoy_request("r-2"), shape) == "r-2"
    assert request_id_in_shape(envoy_request(""), shape) == ""
    assert request_id_in_shape(envoy_request(" \tr-3 "), shape) == "r-3"  # blanks around the value are not the id
    for other in (
        envoy_request("r-2", path="/y"),
        envoy_request("r-2", token="good-bob"),
        envoy_request("r-2") + envoy_request("r-3"),  # a second request in the same read
        envoy_request("r-2\r\nx-auth-subject: mallory"),  # a header smuggled in the id
        envoy_request("r-\x7f2"),
        envoy_request("r-\u00e92"),
        envoy_request("r-2")[:-2],  # not whole
        b"GET /x HTTP/1.1\r\n\r\n",  # shorter than the shape
        envoy_request("r" * 129),  # longer than an id answered from memory may be: the parser and its limits
    ):
        assert request_id_in_shape(other, shape) is None, other
    assert request_id_in_shape(envoy_request("r" * 128), shape) == "r" * 128
    assert request_key(envoy_request("r" * 100_000)).request_id == ""  # kept in the key: never answered by memory
    assert request_shape(b"GET / HTTP/1.1\r\n\r\n", RequestKey(b"GET / HTTP/1.1\r\n\r\n", ""), *shape[2:]) is None


def _raw_request(sep: bytes, request_id: bytes, after: bytes) -> bytes:
    return b"GET /x HTTP/1.1\r\nhost: a\r\nx-request-id:" + sep + request_id + b"\r\n" + after + b"accept: */*\r\n\r\n"


def _plain(request_id: bytes) -> bool:
    return not request_id.translate(None, bytes(range(0x20, 0x7F)))


def _blanks_around_id(sep: bytes, request_id: bytes, _after: bytes) -> tuple[bytes, bytes]:
    value = sep + request_id
    stripped = value.strip(b" \t")
    if not stripped:
        return value, b""
    before = value.index(stripped)
    return value[:before], value[before + len(stripped) :]


_SEPARATORS = st.sampled_from([b"", b" ", b"\t ", b"  "])
# Mostly ids a request may be answered by its shape with, some with any bytes (CR, LF, controls, non-ASCII).
_IDS = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from(" \t"), max_size=10).map(
        str.encode
    ),
    st.binary(max_size=10),
)
_AFTER_ID = st.sampled_from([b"", b" folded\r\n", b"x-a: 1\r\n", b"\r\n"])


@settings(max_examples=400, deadline=None)
@given(
    first=st.tuples(_SEPARATORS, _IDS, _AFTER_ID),
    second=st.tuples(_SEPARATORS, _IDS, _AFTER_ID),
)
def test_a_read_answered_by_its_shape_is_one_request_key_gives_the_same_key(
    first: tuple[bytes, bytes, bytes], second: tuple[bytes, bytes, bytes]
) -> None:
    """Whatever the bytes, the shape's check accepts a read only where request_key finds the shape's key and the
    same id: the cheap check never answers a read that the key would have sent to the parser."""
    data, again = _raw_request(*first), _raw_request(*second)
    first_key = request_key(data)
    assume(first_key is not None and first_key.id_start >= 0)
    assert first_key is not None
    found = request_id_in_shape(again, _shape_of(data))
    key = request_key(again)
    if found is not None:
        assert key is not None and (key.key, key.request_id) == (first_key.key, found)
    elif first[2] == second[2] and _plain(first[1]) and _plain(second[1]) and second[1] == second[1].strip(b" \t"):
        assert _blanks_around_id(*first) != _blanks_around_id(*second)  # the only way the shape can miss


async def test_an_identical_request_is_answered_again_under_its_own_id(
    remembering: Remembering, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("extauthz.pipeline.RECALL_RECORD_DELAY_S", 60.0)  # recorded when the test says, not before
    keyed = count_request_keys(monkeypatch)
    reader, writer = await remembering.connect()
    first = await ask(reader, writer, envoy_request("r-1"))
    second = await ask(reader, writer, envoy_request("r-2"))
    other_path = await ask(reader, writer, envoy_request("r-3", path="/y"))
    assert first.status == second.status == other_path.status == 200
    assert first.headers == second.headers and second.headers["x-auth-subject"] == "alice"
    assert remembering.recorder.seen == [("r-1", False), ("r-3", False)]  # a repeat is recorded a little later
    remembering.pipeline.record_recalled()
    assert remembering.recorder.seen == [("r-1", False), ("r-3", False), ("r-2", True)]
    # r-4 is found by its key (/x was the shape kept); then its shape is kept, and r-5 is found by it.
    assert (await ask(reader, writer, envoy_request("r-4", path="/y"))).status == 200
    assert len(keyed) == 4
    assert (await ask(reader, writer, envoy_request("r-5", path="/y"))).headers == second.headers
    assert len(keyed) == 4  # no key built for r-5
    remembering.pipeline.record_recalled()
    assert remembering.recorder.seen[3:] == [("r-4", True), ("r-5", True)]
    # An id with more blanks around it than a remembered request may hold: found by its key, never kept as a shape.
    padded = envoy_request(" " * 9000 + "r-6", path="/z")
    for _ in range(3):  # parsed, then found by its key twice: never by a shape
        assert (await ask(reader, writer, padded)).status == 200
    assert len(keyed) == 7
    remembering.pipeline.record_recalled()
    assert remembering.recorder.seen[5:] == [("r-6", False), ("r-6", True), ("r-6", True)]
    writer.close()


async def test_a_request_of_the_same_shape_is_answered_from_memory_only_while_its_allow_holds(
    remembering: Remembering, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("extauthz.pipeline.RECALL_RECORD_DELAY_S", 60.0)  # recorded when the test says, not before
    keyed = count_request_keys(monkeypatch)
    now = [1000.0]
    remembering.pipeline = Pipeline(
        [remembering.provider],
        DeclaredPolicy(),
        ResponseSettings(),
        observer=remembering.recorder,
        wall_clock=lambda: now[0],
    )
    reader, writer = await remembering.connect()
    for request_id in ("r-1", "r-2", "r-3"):  # parsed; from memory by its key; by its shape
        assert (await ask(reader, writer, envoy_request(request_id))).status == 200
    assert len(keyed) == 2  # r-3 was found by its shape
    decided = len(remembering.provider.seen)
    now[0] += DECISION_TTL_S + 1  # the allow ran out: decided again, not answered from memory
    assert (await ask(reader, writer, envoy_request("r-4"))).status == 200
    assert len(remembering.provider.seen) == decided + 1
    # An id hiding another header line is not an id: that request is parsed (and its forged header overwritten).
    smuggled = await ask(reader, writer, envoy_request("r-5\r\nx-auth-subject: mallory"))
    assert smuggled.status == 200 and smuggled.headers["x-auth-subject"] == "alice"
    remembering.pipeline.record_recalled()
    assert remembering.recorder.seen == [
        ("r-1", False), ("r-4", False), ("r-5", False), ("r-2", True), ("r-3", True)
    ]  # fmt: skip
    writer.close()


class NoAdminsPolicy(DeclaredPolicy):
    def without_identity(self, inp: CheckInput) -> Verdict | None:
        return None

    def evaluate(self, inp: CheckInput, identity: Identity | None, auth_error: AuthenticationError | None) -> Verdict:
        if inp.path.startswith("/admin"):
            return Verdict(False, 403, Reason.FORBIDDEN, rule="no-admins", message="forbidden")
        return super().evaluate(inp, identity, auth_error)


async def test_a_reload_ends_remembered_answers(remembering: Remembering) -> None:
    reader, writer = await remembering.connect()
    for request_id in ("r-0", "r-1"):  # the second is remembered by key and by shape
        assert (
            await ask(reader, writer, envoy_request(request_id, path="/admin", token="good-bob-admin"))
        ).status == 200
    # A reload swaps the pipeline: what the old one remembered is not used, the new policy answers.
    remembering.pipeline = Pipeline([remembering.provider], NoAdminsPolicy(), ResponseSettings())
    assert (await ask(reader, writer, envoy_request("r-2", path="/admin", token="good-bob-admin"))).status == 403
    writer.close()


async def test_only_one_whole_kept_alive_allowed_request_per_read_is_remembered(remembering: Remembering) -> None:
    reader, writer = await remembering.connect()
    two = envoy_request("r-1") + envoy_request("r-1", path="/y")  # one id for both: only the count tells them apart
    for _ in range(2):  # two requests in one read: both answered, in order, every time; neither remembered
        writer.write(two)
        answers = [await read_response(reader) for _ in range(2)]
        assert [answer.status for answer in answers] == [200, 200]
    denied = envoy_request("r-3", token="bad")
    assert (await ask(reader, writer, denied)).status == 401
    mixed_case = envoy_request("r-4").replace(b"x-request-id", b"X-Request-Id")
    assert (await ask(reader, writer, mixed_case)).status == 200
    head, tail = envoy_request("r-5", path="/z")[:30], envoy_request("r-5", path="/z")[30:]
    writer.write(head)
    await writer.drain()
    await asyncio.sleep(0.05)
    assert (await ask(reader, writer, tail)).status == 200  # one request over two reads
    big = envoy_request("r-7", path="/big", extra=f"x-pad: {'p' * 9000}\r\n")  # over REMEMBER_MAX_BYTES
    assert (await ask(reader, writer, big)).status == 200
    writer.close()
    reader, writer = await remembering.connect()
    answer = await ask(reader, writer, envoy_request("r-6", path="/w", extra="connection: close\r\n"))
    assert answer.headers["connection"] == "close"
    writer.close()
    assert remembering.pipeline._requests == {}
    remembering.pipeline.record_recalled()
    assert all(not recalled for _, recalled in remembering.recorder.seen)


async def test_a_remembered_answer_waits_for_the_answers_owed_before_it(remembering: Remembering) -> None:
    reader, writer = await remembering.connect()
    await ask(reader, writer, envoy_request("r-1"))
    writer.write(envoy_request("r-2", path="/slow", token="refresh"))
    await asyncio.sleep(0.05)
    writer.write(envoy_request("r-3"))  # remembered, but an answer is still owed before it
    await asyncio.sleep(0.05)
    remembering.provider.gate.set()
    slow, again = await read_response(reader), await read_response(reader)
    assert (slow.headers["x-auth-subject"], again.headers["x-auth-subject"]) == ("refresh", "alice")
    writer.close()


# -- slow, silent and too many clients -----------------------------------------------------------------------
@pytest.fixture
async def strict() -> AsyncIterator[Harness]:
    """A listener with a short request timeout and room for three connections."""
    provider = GatedProvider()
    holder: dict[str, Harness] = {}
    listener = await start_http_listener(
        "127.0.0.1", 0, lambda: holder["h"].pipeline, request_timeout_s=0.2, max_connections=3
    )
    holder["h"] = Harness(listener, provider)
    yield holder["h"]
    await listener.stop(1.0)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before closing; fails if it has not closed within ``seconds``."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_a_silent_connection_is_closed_after_the_request_timeout(strict: Harness) -> None:
    reader, writer = await strict.connect()
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_a_request_trickling_in_is_answered_408_and_closed(strict: Harness) -> None:
    reader, writer = await strict.connect()
    writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n")  # never finished
    for _ in range(4):  # still sending, too slowly: the time counts from the request's first byte
        await asyncio.sleep(0.1)
        writer.write(b"X-Slow: 1\r\n")
    answer = await closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"request_timeout"' in answer
    writer.close()


async def test_an_idle_keep_alive_connection_between_requests_stays_open(strict: Harness) -> None:
    reader, writer = await strict.connect()
    for _ in range(2):
        writer.write(request(extra="Authorization: Bearer good-alice\r\n"))
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.5)  # well past the request timeout, between requests
    writer.write(request(extra="Authorization: Bearer good-alice\r\n"))
    assert (await read_response(reader)).status == 200
    writer.close()


async def test_connections_past_the_cap_are_answered_503_and_closed(strict: Harness) -> None:
    held = [await strict.connect() for _ in range(3)]
    reader, writer = await strict.connect()
    answer = await closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"too_many_connections"' in answer
    writer.close()
    # The held ones still work, and once they are gone there is room again.
    held_reader, held_writer = held[0]
    held_writer.write(request(extra="Authorization: Bearer good-alice\r\n"))
    assert (await read_response(held_reader)).status == 200
    for _, other in held:
        other.close()
    for _ in range(100):  # bounded: the server sees the closes
        if not strict.listener._ctx.connections:
            break
        await asyncio.sleep(0.01)
    answer_after = await strict.exchange(request(extra="Authorization: Bearer good-alice\r\n"))
    assert answer_after.status == 200


async def test_pipelined_requests_each_get_their_own_clock(strict: Harness) -> None:
    """Each read ends inside the next request, so the connection is never between requests: still, every request
    arrived whole at once, and none is timed out (found by a review)."""
    reader, writer = await strict.connect()
    one = request(extra="Authorization: Bearer good-alice\r\n")
    writer.write(one[:10])
    for _ in range(20):  # 20 x 30 ms = 0.6 s, twice the request timeout
        await asyncio.sleep(0.03)
        writer.write(one[10:] + one[:10])
        assert (await read_response(reader)).status == 200
    writer.close()


async def test_a_head_under_the_limit_arriving_in_pieces_is_not_refused(harness: Harness) -> None:
    """Reads that end inside the head are counted apart from the parser's count: no byte counts twice (a 40 KiB
    head sent in 1 KiB pieces was refused as over 64 KiB)."""
    filler = "".join(f"X-Filler-{n}: {'v' * 90}\r\n" for n in range(400))  # ~40 KiB
    payload = request(extra=f"Authorization: Bearer good-alice\r\n{filler}")
    reader, writer = await harness.connect()
    for start in range(0, len(payload), 1024):
        writer.write(payload[start : start + 1024])
        await writer.drain()
        await asyncio.sleep(0.001)
    assert (await read_response(reader)).status == 200
    writer.close()


async def test_many_pipelined_requests_in_one_read_are_no_oversized_head(harness: Harness) -> None:
    """Requests answered earlier in the same read never count against the head of the next one (it was 431)."""
    one = request(extra="Authorization: Bearer good-alice\r\n")
    count = (96 * 1024) // len(one)  # well over the 64 KiB head limit in all
    reader, writer = await harness.connect()
    writer.write(one * count + one[:20])
    await writer.drain()
    statuses = [(await read_response(reader)).status for _ in range(count)]
    assert statuses == [200] * count
    writer.write(one[20:])
    assert (await read_response(reader)).status == 200
    writer.close()


async def test_an_endless_trailer_line_is_bounded(harness: Harness) -> None:
    """Trailers are neither head nor body to the callbacks, and the parser keeps a line until it ends: the reads
    after a head are bounded by body plus head limits (413), instead of growing until the request timeout."""
    reader, writer = await harness.connect()
    writer.write(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-Trailer: ")
    try:
        for _ in range(200):  # 200 x 1 KiB, past the harness's 1 KiB body + 64 KiB head
            writer.write(b"v" * 1024)
            await writer.drain()
    except ConnectionError:
        pass
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:60]
    writer.close()
