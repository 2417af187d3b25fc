"""meshgate.resp (the lean pipelined client) against real redis-server processes: order, errors, auth, TLS, db,
reconnects and hung servers. Every wait is bounded by an explicit deadline; nothing asserts on elapsed time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from meshgate.redis import connect, parse_url, ssl_context
from meshgate.resp import NoScriptError, RespClient, RespError
from tests.support.pki import TestCA
from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
    RedisSentinel,
    RedisServer,
    TlsFiles,
    redis_sentinel,
    redis_server,
    redis_standalone,
    redis_tls,
)

TIMEOUT_S = 2.0  # the client's own bound (connect, overdue replies); generous for a loaded machine
GUARD_S = 10.0  # a test-level bound on anything that could hang


def _key() -> str:
    return f"resp-test:{uuid.uuid4().hex}"


def _client(server: RedisServer, **kwargs: Any) -> RespClient:
    return RespClient(("127.0.0.1", server.port), timeout_s=kwargs.pop("timeout_s", TIMEOUT_S), **kwargs)


@pytest.fixture
async def client(redis_standalone: RedisServer) -> AsyncIterator[RespClient]:  # noqa: F811
    made = _client(redis_standalone)
    yield made
    await made.close()


class _CountingTransport:
    """Counts writes on a connected client: it promises one write per call, however many commands the call holds."""

    def __init__(self, client: RespClient) -> None:
        proto: Any = client._proto
        self.inner = proto.transport
        self.writes = 0
        proto.transport = self

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.inner.write(data)

    def abort(self) -> None:
        self.inner.abort()


async def test_concurrent_calls_are_pipelined_and_answered_in_order(client: RespClient) -> None:
    key = _key()
    async with asyncio.timeout(GUARD_S):
        assert await client.execute("PING") == b"PONG"  # connected
        counter = _CountingTransport(client)
        replies = await asyncio.gather(*(client.execute("INCR", key) for _ in range(200)))
        assert replies == list(range(1, 201))  # each caller got its own reply, in the order sent
        assert counter.writes == 200
        several = await client.pipeline([("SET", key, "x"), ("GET", key), ("DEL", key), ("GET", key)])
        assert several == [b"OK", b"x", 1, None]
        assert counter.writes == 201  # four commands, one write
        assert await client.transaction([("INCRBY", key, 5), ("INCRBY", key, 2)]) == [5, 7]
        assert counter.writes == 202
    assert client.connects == 1


async def test_error_replies_raise_and_leave_the_connection_usable(client: RespClient) -> None:
    key = _key()
    async with asyncio.timeout(GUARD_S):
        await client.execute("SET", key, "text")
        with pytest.raises(RespError, match="not an integer"):
            await client.execute("INCR", key)
        with pytest.raises(NoScriptError, match="NOSCRIPT"):
            await client.execute("EVALSHA", "0" * 40, 0)
        with pytest.raises(RespError, match="not an integer") as inside:
            await client.transaction([("SET", f"{key}:n", 1), ("INCRBY", key, 1)])  # an error inside EXEC
        assert not isinstance(inside.value, NoScriptError)
        assert await client.execute("GET", f"{key}:n") == b"1"  # MULTI/EXEC ran the rest: Redis has no rollback
        with pytest.raises(RespError, match="unknown command"):
            await client.pipeline([("PING",), ("NO-SUCH-COMMAND",), ("PING",)])
        assert await client.execute("GET", key) == b"text"
    assert client.connects == 1


def test_runs_on_uvloop(redis_standalone: RedisServer) -> None:  # noqa: F811
    """The service runs on uvloop, whose transports are not asyncio's classes."""

    async def main() -> list[Any]:
        made = _client(redis_standalone)
        try:
            async with asyncio.timeout(GUARD_S):
                key = _key()
                first = await asyncio.gather(*(made.execute("INCR", key) for _ in range(3)))
                return [*first, await made.transaction([("GET", key)])]
        finally:
            await made.close()

    assert uvloop.run(main()) == [1, 2, 3, [b"3"]]


async def test_password_username_and_db_on_connect() -> None:
    with RedisServer(password="s3cret") as server, server.client() as admin:
        admin.execute_command("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all")
        good = _client(server, password="s3cret", db=3)
        alice = _client(server, username="alice", password="alice-pw")
        wrong = _client(server, password="wrong")
        anonymous = _client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await good.execute("SET", "k", "in-db-3") == b"OK"
                assert await alice.execute("ACL", "WHOAMI") == b"alice"
                with pytest.raises(RespError, match="WRONGPASS") as info:
                    await wrong.execute("PING")
                assert "wrong" not in str(info.value)
                with pytest.raises(RespError, match="NOAUTH"):
                    await anonymous.execute("PING")
        finally:
            for made in (good, alice, wrong, anonymous):
                await made.close()
        admin.select(3)  # type: ignore[attr-defined]  # redis-py's select() lives on the connection mixin
        assert admin.get("k") == b"in-db-3"
        admin.select(0)  # type: ignore[attr-defined]
        assert admin.get("k") is None


async def test_tls_with_a_client_certificate(redis_tls: tuple[RedisServer, TestCA], tmp_path: Path) -> None:  # noqa: F811
    server, ca = redis_tls
    client_files = ca.spiffe_client("spiffe://test/ns/default/sa/ratelimit")
    base = f"rediss://:pw@127.0.0.1:{server.port}"
    trusted = ssl_context(parse_url(f"{base}?ca_cert={ca.ca_file}&cert={client_files.cert}&key={client_files.key}"))
    (tmp_path / "other").mkdir()
    untrusted = ssl_context(parse_url(f"{base}?ca_cert={TestCA(tmp_path / 'other').ca_file}"))
    good = _client(server, password="pw", ssl_context=trusted)
    bad = _client(server, password="pw", ssl_context=untrusted)
    try:
        async with asyncio.timeout(GUARD_S):
            assert await good.execute("PING") == b"PONG"
            assert (await good.execute("CLIENT", "INFO")).startswith(b"id=")
            with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
                await bad.execute("PING")
    finally:
        await good.close()
        await bad.close()


async def test_reconnects_after_a_restart_and_fails_pending_calls(redis_server: RedisServer) -> None:  # noqa: F811
    made = _client(redis_server)
    try:
        async with asyncio.timeout(GUARD_S):
            assert await made.execute("PING") == b"PONG"
            # calls queued behind a blocking one are all pending when the server dies: every one fails
            blocked = [asyncio.ensure_future(made.execute("BLPOP", _key(), 30))]
            blocked += [asyncio.ensure_future(made.execute("PING")) for _ in range(3)]
            await asyncio.sleep(0.05)  # let them reach the server
            redis_server.stop()
            results = await asyncio.gather(*blocked, return_exceptions=True)
            assert all(isinstance(result, ConnectionError) for result in results), results
            with pytest.raises(ConnectionRefusedError):
                await made.execute("PING")  # down: the call fails at once, it does not wait
            redis_server.start()  # same port, fresh process
            assert await made.execute("PING") == b"PONG"
    finally:
        await made.close()
    assert made.connects == 2


async def test_a_hung_server_times_out_every_call_then_the_client_recovers(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    made = _client(redis_server, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    try:
        assert await made.execute("PING") == b"PONG"
        with redis_server.paused():
            async with asyncio.timeout(GUARD_S):  # only a guard: the client's own deadline must answer
                first_sent = loop.time()
                first = asyncio.ensure_future(made.execute("PING"))
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(made.execute("PING"))  # stuck behind the first on the connection
                results = await asyncio.gather(first, second, return_exceptions=True)
            assert [type(result) for result in results] == [TimeoutError, TimeoutError]
            assert loop.time() - first_sent >= 0.2  # not before the deadline
            # The stuck connection was dropped: the next call opens another, which the paused server also
            # leaves unanswered.
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(TimeoutError):
                    await made.execute("PING")
            assert made.connects == 2
        async with asyncio.timeout(GUARD_S):  # resumed: it answers (on that connection, or on a fresh one)
            assert await made.execute("PING") == b"PONG"
    finally:
        await made.close()


async def test_answered_calls_never_time_out_across_many_deadlines(redis_server: RedisServer) -> None:  # noqa: F811
    """The one timer re-arms for each new oldest call: a steady trickle over several deadlines all succeeds."""
    made = _client(redis_server, timeout_s=0.5)  # a loaded CI machine may stall a reply by 0.1-0.2 s
    loop = asyncio.get_running_loop()
    try:
        started, answered = loop.time(), 0
        while loop.time() - started < 2.2:  # ~4 deadlines, with calls in flight nearly all the time
            replies = await asyncio.gather(*(made.execute("PING") for _ in range(4)))
            assert replies == [b"PONG"] * 4
            answered += 4
        assert answered > 20 and made.connects == 1
    finally:
        await made.close()


async def test_connecting_to_a_hung_server_is_bounded() -> None:
    with RedisServer(password="pw") as server:
        made = _client(server, password="pw", timeout_s=0.2)
        try:
            with server.paused():
                async with asyncio.timeout(GUARD_S):  # the handshake (AUTH) gets no answer: the connect times out
                    with pytest.raises(TimeoutError):
                        await made.execute("PING")
            async with asyncio.timeout(GUARD_S):
                assert await made.execute("PING") == b"PONG"
        finally:
            await made.close()


async def test_concurrent_callers_share_one_connect(redis_server: RedisServer) -> None:  # noqa: F811
    made = _client(redis_server)
    try:
        async with asyncio.timeout(GUARD_S):
            assert await asyncio.gather(*(made.execute("PING") for _ in range(20))) == [b"PONG"] * 20
        assert made.connects == 1
    finally:
        await made.close()


async def test_close_fails_pending_calls_and_a_later_call_reconnects(redis_server: RedisServer) -> None:  # noqa: F811
    made = _client(redis_server)
    async with asyncio.timeout(GUARD_S):
        await made.execute("PING")
        pending = asyncio.ensure_future(made.execute("BLPOP", _key(), 30))
        await asyncio.sleep(0.05)
        await made.close()
        with pytest.raises(ConnectionError):
            await pending
        assert await made.execute("PING") == b"PONG"
        await made.close()
        await made.close()  # idempotent


async def test_sentinel_discovery_at_every_connect(redis_sentinel: RedisSentinel) -> None:  # noqa: F811
    target = connect(redis_sentinel.url, timeout_s=TIMEOUT_S)
    assert target.resp is not None
    try:
        async with asyncio.timeout(GUARD_S):
            key = _key()
            assert await target.resp.execute("INCR", key) == 1
            assert (await target.resp.execute("ROLE"))[0] == b"master"
        with redis_sentinel.master.client() as admin:
            assert admin.get(key) == b"1"  # it found the master through the sentinel
    finally:
        await target.close()

    async def nobody_knows() -> tuple[str, int]:
        raise LookupError("no sentinel answers")

    lost = RespClient(nobody_knows, timeout_s=TIMEOUT_S)
    with pytest.raises(ConnectionError, match="discovery failed: no sentinel answers"):
        await lost.execute("PING")
    assert "discovered" in repr(lost)


def test_arguments_and_repr() -> None:
    with pytest.raises(ValueError, match="timeout"):
        RespClient(("127.0.0.1", 1), timeout_s=0)
    shown = repr(RespClient(("127.0.0.1", 1), timeout_s=1, password="hunter2", db=2))
    assert "hunter2" not in shown
    assert "db=2" in shown


async def test_close_while_connecting_fails_the_waiting_calls() -> None:
    with RedisServer(password="pw") as server:
        made = _client(server, password="pw", timeout_s=GUARD_S)
        with server.paused():  # the handshake hangs: the connect is in progress
            waiting = asyncio.ensure_future(made.execute("PING"))
            await asyncio.sleep(0.05)
            await made.close()
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(ConnectionError, match="closed while connecting"):
                    await waiting
        assert await made.pipeline([]) == []  # nothing to send: no connection needed
        await made.close()


@pytest.mark.parametrize("ttl", [0, 7, 1234567890123, -5])
def test_a_command_packed_in_pieces_is_packed_as_a_whole(ttl: int) -> None:
    from meshgate.resp import pack, pack_args, pack_head, pack_int

    for key in ("k{tag}:1700000000", "é" * 12, b"raw\r\nbytes"):
        pieces = pack_head(6) + pack_args("SET", key, 0, "PX") + pack_int(ttl) + pack_args("NX")
        assert pieces == pack([("SET", key, 0, "PX", ttl, "NX")])
        assert pack_int(ttl) == pack_args(ttl)
