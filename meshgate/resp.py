"""A lean, pipelined RESP2 client for the hot path: one connection, one ``transport.write`` per call.

Why not redis-py here: its client machinery costs ~85-100 us of CPU per call on this VM, against ~25 us for an
``asyncio.Protocol`` feeding ``hiredis.Reader`` (measured with EVALSHA, both on uvloop). This client does only what
the rate-limit backend needs; everything else (Cluster with its slot maps and MOVED/ASK, admin commands, tools) stays
on redis-py (``meshgate.redis``).

- Pipelining: calls from concurrent tasks go out as they come; replies come back in order and are matched to a FIFO
  of pending calls. A call may be several commands (e.g. MULTI ... EXEC): one write, one future.
- Connecting: lazily on the first call and again after the connection is lost, bounded by ``timeout_s``; concurrent
  callers share one attempt. AUTH and SELECT go in the same write as the handshake. TLS by an ``ssl.SSLContext``.
  ``address`` may be a unix socket's path, or a coroutine function asked at every (re)connect: Sentinel master
  discovery plugs in there.
- Deadlines: every call fails with ``TimeoutError`` when its reply is not back within ``timeout_s`` of sending it
  (connecting first is bounded by ``timeout_s`` too). One timer per connection does it, re-armed only when it fires
  (``asyncio.timeout`` around each call cost ~5 us of CPU: a timer per call). Replies come in order, so an overdue
  oldest call means the connection is stuck (Redis stopped, a dead peer): it is dropped, failing every pending call,
  and the next call opens a new one.
- Failures: connection loss fails every pending call with ``ConnectionError``; the next call reconnects. An error
  reply raises ``RespError`` (``NoScriptError`` for NOSCRIPT); a READONLY reply (a demoted Sentinel master) also
  drops the connection, so the next one asks Sentinel again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis

Arg = str | bytes | int | float
Command = tuple[Arg, ...]
Address = tuple[str, int]


class RespError(Exception):
    """An error reply from Redis (the message is Redis's, e.g. ``WRONGTYPE ...``)."""


class NoScriptError(RespError):
    """NOSCRIPT: the script's SHA is not in Redis's script cache (answer with EVAL of the source)."""


def checked_timeout(timeout_s: float) -> float:
    """``timeout_s`` if it is a usable Redis deadline (> 0 seconds; NaN is not), else ValueError."""
    if not timeout_s > 0:
        raise ValueError(f"Redis timeout must be > 0 seconds, got {timeout_s}")
    return timeout_s


def _reply_error(message: str) -> RespError:
    return NoScriptError(message) if message.startswith("NOSCRIPT") else RespError(message)


def pack(commands: Sequence[Command]) -> bytes:
    """The RESP encoding of ``commands``, ready for one write."""
    return b"".join([_pack_command(command) for command in commands])


_pack_command: Callable[[Command], bytes] = hiredis.pack_command  # type: ignore[assignment]  # its stub says 1-tuple
_MULTI = _pack_command(("MULTI",))
_EXEC = _pack_command(("EXEC",))


def pack_head(count: int) -> bytes:
    """The header of a command of ``count`` arguments. With ``pack_args`` and ``pack_int``, a caller can pack a
    command once in pieces and change one argument per call (``b"".join`` of the pieces)."""
    return b"*%d\r\n" % count


def pack_args(*args: Arg) -> bytes:
    """Arguments as RESP bulk strings, without a command header (see ``pack_head``)."""
    return b"".join([_pack_command((arg,))[4:] for arg in args])  # each minus its own "*1\r\n" header


def pack_int(value: int) -> bytes:
    """``pack_args(value)`` for one integer, without hiredis: it is the piece that changes per call."""
    digits = b"%d" % value
    return b"$%d\r\n%b\r\n" % (len(digits), digits)


class _Call:
    """One pending call: ``count`` replies resolve ``future`` with their list."""

    __slots__ = ("count", "future", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent_at: float) -> None:
        self.future = future
        self.count = count
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _Protocol(asyncio.Protocol):
    """One connection: writes calls, matches replies to them in order, fails them at their deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(replyError=_reply_error)
        self.pending: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._watchdog: asyncio.TimerHandle | None = None  # armed for the oldest pending call's deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses

    def send(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        if self.closed or self.transport is None:
            raise ConnectionError("redis connection closed")
        loop = self.loop
        future: asyncio.Future[list[Any]] = loop.create_future()
        sent_at = loop.time()
        self.pending.append(_Call(future, count, sent_at))
        if self._watchdog is None:
            self._watchdog = loop.call_at(sent_at + self.timeout_s, self._check_deadline)
        self.transport.write(data)
        return future

    def _check_deadline(self) -> None:
        """The watchdog fired: drop a stuck connection, else wait for the (new) oldest call's deadline."""
        self._watchdog = None
        if self.closed or not self.pending:
            return  # the next call arms it again
        deadline = self.pending[0].sent_at + self.timeout_s
        if self.loop.time() >= deadline:
            self.abort(f"no reply within {self.timeout_s} s", TimeoutError)
        else:
            self._watchdog = self.loop.call_at(deadline, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as error:
                self.abort(f"protocol error: {error}")
                return
            if reply is False:
                return
            if not pending:
                self.abort("a reply nobody asked for")
                return
            call = pending[0]
            call.replies.append(reply)
            if len(call.replies) == call.count:
                pending.popleft()
                if not call.future.done():  # its caller may have given up (deadline, cancellation)
                    call.future.set_result(call.replies)

    def abort(self, reason: str, error: type[OSError] = ConnectionError) -> None:
        """Drop the connection now; every pending call fails with ``error(reason)``."""
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows on a later loop turn: fail the calls now
        self._lost(error(f"redis connection dropped: {reason}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(ConnectionError(f"redis connection lost: {exc or 'closed by the server'}"))

    def _lost(self, error: OSError) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)


class RespClient:
    """One pipelined connection to one Redis server (the address may move: see ``address``)."""

    def __init__(
        self,
        address: Address | str | Callable[[], Awaitable[Address]],
        *,
        timeout_s: float,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._address = address
        self.timeout_s = checked_timeout(timeout_s)
        self._username = username
        self._password = password
        self._db = db
        self._ssl = ssl_context
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self.connects = 0  # connections opened (tests, metrics)

    def __repr__(self) -> str:
        where = self._address if isinstance(self._address, tuple | str) else "discovered"
        return f"RespClient({where}, db={self._db}, tls={self._ssl is not None})"

    async def execute(self, *command: Arg) -> Any:
        """One command; its reply, or RespError for an error reply."""
        (reply,) = await self.pipeline((command,))
        return reply

    async def pipeline(self, commands: Sequence[Command]) -> list[Any]:
        """Several commands in one write; their replies in order. The first error reply raises (all are read)."""
        if not commands:
            return []
        proto = self._usable() or await self._reconnect()
        replies = await proto.send(pack(commands), len(commands))
        _raise_first_error(proto, replies)
        return replies

    async def transaction(self, commands: Sequence[Command]) -> list[Any]:
        """``commands`` inside MULTI ... EXEC, in one write: EXEC's replies. Any error reply raises."""
        return await self.transaction_packed(pack(commands), len(commands))

    async def transaction_packed(self, packed: bytes, count: int) -> list[Any]:
        """``transaction`` of ``count`` commands already packed into ``packed``."""
        proto = self._usable() or await self._reconnect()
        replies = await proto.send(_MULTI + packed + _EXEC, count + 2)
        _raise_first_error(proto, replies)  # MULTI's OK, the QUEUED replies
        results: list[Any] = replies[-1]
        _raise_first_error(proto, results)  # the commands' own replies
        return results

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._proto is not None:
            self._proto.abort("closed by the client")
            self._proto = None

    def _usable(self) -> _Protocol | None:
        proto = self._proto
        return None if proto is None or proto.closed else proto

    async def _reconnect(self) -> _Protocol:
        self._proto = None
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(self._connected)
        # shielded: one caller's deadline must not cancel the attempt the others wait for (it has its own bound)
        attempt = self._connecting
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.cancelled() and (current is None or not current.cancelling()):  # close(), not our caller
                raise ConnectionError("redis client closed while connecting") from None
            raise

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        current = self._connecting is task  # not so for an attempt close() abandoned
        if current:
            self._connecting = None
        if task.cancelled() or task.exception() is not None:  # (retrieved: no "never retrieved" warning)
            return
        if current:
            self._proto = task.result()
        else:
            task.result().abort("closed by the client")

    async def _connect(self) -> _Protocol:
        """A new connection to the address (a unix socket's path, host and port, or asked of the discovery)."""
        loop = asyncio.get_running_loop()

        def factory() -> _Protocol:
            return _Protocol(loop, self.timeout_s)

        address = self._address
        if isinstance(address, str):
            return (await loop.create_unix_connection(factory, address))[1]  # no TLS on a socket
        if not isinstance(address, tuple):
            try:
                address = await address()
            except Exception as error:  # e.g. no sentinel answers: one kind of failure for the caller
                raise ConnectionError(f"redis address discovery failed: {error}") from error
        host, port = address
        ssl_host = host if self._ssl else None
        return (await loop.create_connection(factory, host, port, ssl=self._ssl, server_hostname=ssl_host))[1]

    async def _open(self) -> _Protocol:
        async with asyncio.timeout(self.timeout_s):
            proto = await self._connect()
            try:
                handshake: list[Command] = []
                if self._password is not None:
                    auth = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
                    handshake.append(auth)
                if self._db:
                    handshake.append(("SELECT", self._db))
                if handshake:
                    for reply in await proto.send(pack(handshake), len(handshake)):
                        if isinstance(reply, RespError):
                            raise reply
            except BaseException:
                proto.abort("handshake failed")
                raise
        self.connects += 1
        return proto


def _raise_first_error(proto: _Protocol | None, replies: list[Any]) -> None:
    for reply in replies:
        if isinstance(reply, RespError):
            if proto is not None and str(reply).startswith("READONLY"):
                proto.abort("the server is a replica now")
            raise reply
