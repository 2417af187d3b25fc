"""Envoy's HTTP ext_authz mode (also nginx ``auth_request`` / Traefik ForwardAuth) on a raw asyncio protocol.

The low-latency transport: httptools parses, ``Pipeline.decide`` answers synchronously inside the parser
callback and the response bytes go out in the same tick. Only a ``RefreshNeeded`` (unknown JWT key) costs a
task. Responses keep request order per connection (HTTP/1.1 pipelining).

Envoy sends the same bytes for every request of one client to one path, apart from ``x-request-id``. An allowed
request that arrived alone in one read is remembered by those bytes with its encoded answer
(``Pipeline.remember_request``), and a later identical one is answered without parsing it: parsing into Python
objects was most of this transport's CPU. Its decision is recorded (metrics, sampled audit) with the next batch of
such repeats (``Pipeline.record_recall``), after the answer. Each connection also keeps the last request it found
that way, split around its id's value (``RequestShape``): a read of the same bytes around another id is answered
after comparing them, without building its key, which costs several times more with the caches cold between
requests. The shape answers until its allow runs out or the pipeline is replaced, even if the pipeline's bounded
memory dropped the request meanwhile.

Allow: 200 with the identity headers, ``x-envoy-auth-headers-to-remove`` and flat ``x-meshgate-md-<key>``
headers (Envoy's ``dynamic_metadata_from_headers``). Deny: the decision's status, headers and JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from time import monotonic, perf_counter
from typing import NamedTuple, cast

import httptools

from extauthz.identity.base import RefreshNeeded
from extauthz.model import CheckInput, Decision, Reason
from extauthz.pipeline import REQUEST_ID_HEADER, Pipeline, RememberedRequest
from extauthz.response import header_safe
from meshgate.periodic import Periodic

log = logging.getLogger(__name__)

METADATA_HEADER_PREFIX = "x-meshgate-md-"
HEADERS_TO_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
ALLOW_CACHE_SIZE = 4096
# Requests remembered by their bytes are at most this long (Envoy's checks with a JWT are 1-2 KiB): the memory held
# stays bounded by the pipeline's REQUEST_CACHE_SIZE times this, whatever bodies or headers clients send.
REMEMBER_MAX_BYTES = 8 * 1024
LINGER_S = 2.0  # after answering and half-closing, how long to wait for the peer to close
# A request must arrive whole within this of its first byte, and a new connection must bring its first request
# within it: Envoy sends whole requests at once, so only slow or silent clients (slowloris) meet it. An idle
# keep-alive connection between requests is Envoy's to close (its pools keep them up to an hour).
DEFAULT_REQUEST_TIMEOUT_S = 10.0
# Connections beyond this are answered 503 and closed at once: each one holds a file descriptor and memory.
DEFAULT_MAX_CONNECTIONS = 10_000

_ALLOW_HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
_CLOSE = b"connection: close\r\n"
_CRLF = b"\r\n"
_SEP = b": "


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {status.value: _status_line(status.value) for status in HTTPStatus}


def _error_response(status: int, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    return (
        _STATUS_LINES[status]
        + b"content-type: application/json\r\n"
        + b"content-length: %d\r\n" % len(body)
        + _CLOSE
        + _CRLF
        + body
    )


_BAD_REQUEST = _error_response(400, "bad_request", "malformed HTTP request")
_HEADERS_TOO_LARGE = _error_response(431, "headers_too_large", "request headers too large")
_BODY_TOO_LARGE = _error_response(413, "body_too_large", "request body too large")
_INTERNAL_ERROR = _error_response(500, Reason.INTERNAL_ERROR.value, "internal error")
_REQUEST_TIMEOUT = _error_response(408, "request_timeout", "request not received in time")
_TOO_MANY_CONNECTIONS = _error_response(503, "too_many_connections", "too many connections")


def _clean(value: str) -> bytes:
    """Header-safe bytes (``response.header_safe``: control characters dropped)."""
    return header_safe(value).encode("utf-8")


def encode_decision(decision: Decision, *, head: bool = False, close: bool = False) -> bytes:
    """The HTTP answer for ``decision``. ``head``: no body (the request was HEAD); ``close``: say so."""
    parts: list[bytes]
    if decision.allowed:
        parts = [_ALLOW_HEAD]
        for name, value in decision.headers_to_set:
            parts += (name.encode("ascii", "ignore"), _SEP, _clean(value), _CRLF)
        if decision.headers_to_remove:
            parts += (
                b"x-envoy-auth-headers-to-remove: ",
                _clean(",".join(decision.headers_to_remove)),
                _CRLF,
            )
        for key, value in decision.metadata.items():
            parts += (b"x-meshgate-md-", _clean(key), _SEP, _clean(value), _CRLF)
        body = b""
    else:
        status_line = _STATUS_LINES.get(decision.status) or _status_line(decision.status)
        body = decision.body
        parts = [status_line, b"content-length: %d\r\n" % len(body)]
        for name, value in decision.response_headers:
            parts += (name.encode("ascii", "ignore"), _SEP, _clean(value), _CRLF)
    if close:
        parts.append(_CLOSE)
    parts.append(_CRLF)
    if body and not head:
        parts.append(body)
    return b"".join(parts)


class _Context:
    """What every connection of one server shares: settings, and the live connections for a graceful stop."""

    def __init__(
        self,
        get_pipeline: Callable[[], Pipeline],
        path_prefix: str,
        forward_auth_path: str,
        max_header_bytes: int,
        max_body_bytes: int,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.get_pipeline = get_pipeline
        self.path_prefix = path_prefix.rstrip("/")
        self.forward_auth_path = forward_auth_path
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.closing = False
        self.all_closed = asyncio.Event()
        # Encoded allow answers by decision object (the pipeline reuses allow decisions): skips re-encoding.
        self._allow_bytes: dict[int, tuple[Decision, bytes]] = {}

    def drop_slow_requests(self) -> None:
        """Close the connections whose request (or first request) has not arrived whole in time."""
        deadline = monotonic() - self.request_timeout_s
        for connection in list(self.connections):
            since = connection.waiting_since
            if since is not None and since < deadline:
                connection.time_out()

    def encode(self, decision: Decision, head: bool, close: bool) -> bytes:
        if not decision.allowed or close:
            return encode_decision(decision, head=head, close=close)
        cached = self._allow_bytes.get(id(decision))
        if cached is not None and cached[0] is decision:
            return cached[1]
        payload = encode_decision(decision)  # an allow has no body, so HEAD and GET answers are the same bytes
        if len(self._allow_bytes) >= ALLOW_CACHE_SIZE:
            self._allow_bytes.clear()
        self._allow_bytes[id(decision)] = (decision, payload)
        return payload


_REQUEST_ID_LINE = b"\r\n" + REQUEST_ID_HEADER.encode() + b":"
_ID_CHARS = bytes(range(0x20, 0x7F))  # what a request id answered from memory may hold: printable ASCII
_ID_BLANKS = b" \t"
# A request id answered from memory is at most this long (Envoy's own are 36-character UUIDs): a longer one takes
# the parser's path, where the header size limit applies.
MAX_REMEMBERED_ID_BYTES = 128


def _request_id_line(data: bytes) -> tuple[int, int, int, int] | None:
    """Where ``data``'s ``x-request-id`` line is: (line start, value start, value end, line end), the value without
    its surrounding blanks. None when there is none in the header section, or when the request must keep it in its
    key: its value holds a character a parser may refuse, or a folded line follows it."""
    start = data.find(_REQUEST_ID_LINE)
    if start < 0 or data.find(b"\r\n\r\n", 0, start + 2) >= 0:  # none, or in the body
        return None
    stop = data.find(b"\r\n", start + 2)
    raw = data[start + len(_REQUEST_ID_LINE) : stop]
    value = raw.strip(_ID_BLANKS)
    value_start = stop - len(raw.lstrip(_ID_BLANKS))
    if (
        len(value) > MAX_REMEMBERED_ID_BYTES
        or value.translate(None, _ID_CHARS)
        or data[stop + 2 : stop + 3] in (b" ", b"\t")
    ):
        return None
    return start, value_start, value_start + len(value), stop


class RequestKey(NamedTuple):
    """A read's key for the remembered requests (``key``: the read without its id line) and its request id.
    ``id_start``/``id_end``: where the id's value is in the read, -1 when the key is the whole read."""

    key: bytes
    request_id: str
    id_start: int = -1
    id_end: int = -1


def request_key(data: bytes) -> RequestKey | None:
    """``data`` without its ``x-request-id`` header line, and that header's value ("" when there is none).

    None when ``data`` does not hold a whole header section. Only the lower-case spelling (Envoy's) is taken out:
    the key of a request spelling it otherwise keeps its id, so it is never remembered (see ``_remember``).
    """
    if not data.endswith(b"\r\n\r\n") and data.find(b"\r\n\r\n") < 0:  # the common case first: no body
        return None
    line = _request_id_line(data)
    if line is None:
        return RequestKey(data, "")
    start, value_start, value_end, stop = line
    return RequestKey(data[:start] + data[stop:], data[value_start:value_end].decode("ascii"), value_start, value_end)


class RequestShape(NamedTuple):
    """A request answered from memory, around its id's value: a later read that is ``head``, an id, ``tail`` has
    the same key (``request_key``), so it gets the same answer, found without building the key."""

    head: bytes
    tail: bytes
    entry: RememberedRequest
    pipeline: Pipeline


def request_shape(data: bytes, key: RequestKey, entry: RememberedRequest, pipeline: Pipeline) -> RequestShape | None:
    """The shape of ``data`` (keyed ``key``) answered with ``entry``; None when its key keeps it whole, or when the
    read is over ``REMEMBER_MAX_BYTES`` (blanks around the id are not in the key, so the key alone does not bound it).
    """
    if key.id_start < 0 or len(data) > REMEMBER_MAX_BYTES:
        return None
    return RequestShape(data[: key.id_start], data[key.id_end :], entry, pipeline)


def request_id_in_shape(data: bytes, shape: RequestShape) -> str | None:
    """The request id of ``data`` when it has ``shape`` (``request_key`` would give it the shape's key), else None.

    Two comparisons of the bytes around the id and a check of the id: cheaper than building the key (three scans,
    a copy of the 1-2 KiB read and its hash), where every step costs microseconds with the caches cold.
    """
    head, tail = shape.head, shape.tail
    end = len(data) - len(tail)
    if end < len(head) or not data.startswith(head) or not data.endswith(tail):
        return None
    value = data[len(head) : end].strip(_ID_BLANKS)
    if len(value) > MAX_REMEMBERED_ID_BYTES or value.translate(None, _ID_CHARS):  # request_key keeps it in the key
        return None
    return value.decode("ascii")


class _HeadersTooLarge(Exception):
    pass


class _BodyTooLarge(Exception):
    pass


# A response slot: finished bytes, or a task still deciding; plus whether to close after writing it.
_Slot = list[object]


class _Connection(asyncio.Protocol):
    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._header_bytes = 0  # of the head, as the parser's callbacks saw it
        self._head_read_bytes = 0  # of the reads that were all head
        self._tail_read_bytes = 0  # of the reads that were all after the head (body, framing, trailers)
        self._messages_begun = 0
        self._max_header_bytes = ctx.max_header_bytes
        self._body_bytes = 0
        self._in_message = False
        self._headers_complete = False
        self._pending: deque[_Slot] = deque()
        # The read being parsed, when it may be remembered: its key, and what its only request was answered with.
        self._read_key: RequestKey | None = None
        self._messages_in_read = 0
        self._answered: tuple[Pipeline, CheckInput, Decision] | None = None
        self._shape: RequestShape | None = None  # the last request found by its key in the pipeline's memory
        self._closing = False  # stop reading: a broken request was answered, close after the answers owed
        self._draining = False  # server stopping: close once idle
        self._linger: asyncio.TimerHandle | None = None
        # When the request being received began (or the connection opened), while it is not whole: see
        # DEFAULT_REQUEST_TIMEOUT_S. None between requests. Set per message, so pipelined requests each count.
        self.waiting_since: float | None = monotonic()

    # -- asyncio.Protocol ------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, but it has the same interface.
        self._transport = cast(asyncio.Transport, transport)
        if len(self._ctx.connections) >= self._ctx.max_connections:
            self._transport.write(_TOO_MANY_CONNECTIONS)
            self._close_gracefully()
            self.waiting_since = None
            return
        self._ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._linger is not None:
            self._linger.cancel()
        for slot in self._pending:
            if isinstance(slot[0], asyncio.Task):
                slot[0].cancel()
        self._pending.clear()
        self._ctx.connections.discard(self)
        if not self._ctx.connections:
            self._ctx.all_closed.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._in_message or self._pending or self._ctx.closing:
            self._read_key = None
        else:
            # A request identical to a remembered one (see the module's doc) is answered without parsing it.
            started = perf_counter()
            self._read_key = None
            self._messages_in_read = 0
            self._answered = None
            try:
                pipeline = self._ctx.get_pipeline()
            except Exception:  # noqa: S110  # parsed instead: answered 500, the error logged there
                pass
            else:
                transport = self._transport
                shape = self._shape
                entry = request_id = None
                if shape is not None:
                    if shape.pipeline is not pipeline or not pipeline.still_valid(shape.entry):
                        self._shape = None  # reloaded or run out: let the old pipeline and answer go
                    else:
                        # Most often the last request answered from memory again, but for its id: no key to build.
                        request_id = request_id_in_shape(data, shape)
                        if request_id is not None:
                            entry = shape.entry
                if entry is None:
                    key = self._read_key = request_key(data)
                    if key is not None:
                        entry, request_id = pipeline.recall(key.key), key.request_id
                        if entry is not None:
                            self._shape = request_shape(data, key, entry, pipeline)
                if entry is not None and request_id is not None and transport is not None:
                    elapsed = perf_counter() - started
                    transport.write(entry.answer)
                    pipeline.record_recall(entry, request_id, elapsed)
                    self.waiting_since = None
                    return
        head_before = self._in_message and not self._headers_complete
        begun = self._messages_begun
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish_after_pending()  # upgrades are not ours to serve; answer what was asked, then close
        except httptools.HttpParserCallbackError as error:
            if isinstance(error.__context__, _HeadersTooLarge):
                self._fail(_HEADERS_TOO_LARGE)
            elif isinstance(error.__context__, _BodyTooLarge):
                self._fail(_BODY_TOO_LARGE)
            else:
                log.error("HTTP ext_authz callback failed", exc_info=error.__context__)
                self._fail(_INTERNAL_ERROR)
        except Exception:
            self._fail(_BAD_REQUEST)
        else:
            if self._in_message and begun == self._messages_begun and self._over_read_bounds(len(data), head_before):
                return
            self._remember()

    def _over_read_bounds(self, size: int, head_before: bool) -> bool:
        """Count a read that went wholly into the current message (none began in it). The parser keeps a header or
        trailer line to itself until it ends, so the callbacks' counts alone would not bound an endless line: reads
        that were all head count against the head limit, reads after the head (body, chunk framing, trailers)
        against twice the body limit plus the head limit. Counted apart from the callbacks, so no byte counts twice."""
        if not self._headers_complete:
            if head_before:
                self._head_read_bytes += size
                if self._head_read_bytes > self._max_header_bytes:
                    self._fail(_HEADERS_TOO_LARGE)
                    return True
        elif not head_before:
            self._tail_read_bytes += size
            # Twice the body: a chunked body's framing (sizes, CRLFs) may add as much as its data in small chunks.
            if self._tail_read_bytes > 2 * self._ctx.max_body_bytes + self._max_header_bytes:
                self._fail(_BODY_TOO_LARGE)
                return True
        return False

    # -- identical requests ----------------------------------------------------------------------------------
    def _remember(self) -> None:
        """Remember the read just parsed when it was one whole request, allowed, answered at once, kept open."""
        key, answered = self._read_key, self._answered
        self._read_key = self._answered = None
        if key is None or answered is None or self._messages_in_read != 1 or self._in_message:
            return
        if len(key.key) > REMEMBER_MAX_BYTES:
            return
        pipeline, inp, decision = answered
        if inp.request_id == key.request_id:  # else the id was spelt otherwise or repeated: the key still holds it
            pipeline.remember_request(key.key, inp, decision, self._ctx.encode(decision, False, False))

    def eof_received(self) -> bool:
        """The peer stopped sending: close once the answers still owed are written."""
        if self._pending:
            self._draining = True
            return True
        return False

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self.waiting_since = monotonic()  # this request's clock (pipelined ones each get their own)
        self._url = []
        self._headers = {}
        self._header_bytes = 0
        self._head_read_bytes = self._tail_read_bytes = 0
        self._messages_begun += 1
        self._body_bytes = 0
        self._headers_complete = False

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            raise _HeadersTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:  # once per header: kept to the bare minimum
        size = self._header_bytes + len(name) + len(value) + 4
        self._header_bytes = size
        if size > self._max_header_bytes:
            raise _HeadersTooLarge
        if self._headers_complete:  # a chunked body's trailers: never headers the decision reads
            return
        key = name.decode("latin-1").lower()
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]},{value.decode('latin-1')}"
        else:
            headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_complete = True

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)  # read and ignored; Envoy sends none unless with_request_body
        if self._body_bytes > self._ctx.max_body_bytes:
            raise _BodyTooLarge

    def on_message_complete(self) -> None:
        self._in_message = False
        self.waiting_since = None
        self._messages_in_read += 1
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method().decode("ascii", "replace")
        head = method == "HEAD"
        close = not keep_alive or self._ctx.closing
        try:
            pipeline = self._ctx.get_pipeline()
        except Exception:
            log.exception("no pipeline to answer; denying")
            self._respond(_INTERNAL_ERROR, close=True)
            return
        try:
            inp = self._to_input(method)
        except Exception:
            self._respond(_BAD_REQUEST, close=True)
            return
        try:
            decision = pipeline.decide(inp)
        except RefreshNeeded as needed:
            task = asyncio.get_running_loop().create_task(pipeline.check_after_refresh(inp, needed))
            slot: _Slot = [task, close, head]
            self._pending.append(slot)
            task.add_done_callback(self._task_done)
            return
        except Exception:
            log.exception("decide failed; denying")
            decision = pipeline.fail_closed(inp, Reason.INTERNAL_ERROR, "internal error")
        if decision.allowed and not close and self._read_key is not None:
            self._answered = (pipeline, inp, decision)
        self._respond(self._ctx.encode(decision, head, close), close=close)

    # -- request -> CheckInput -------------------------------------------------------------------------------
    def _to_input(self, method: str) -> CheckInput:
        url = b"".join(self._url)
        headers = self._headers
        if url.startswith(b"http://") or url.startswith(b"https://"):
            parsed = httptools.parse_url(url)  # absolute-form request target
            url = parsed.path or b"/"
            if parsed.query:
                url += b"?" + parsed.query
        raw = url.decode("latin-1")
        path, _, query = raw.partition("?")
        host = headers.get("host", "")
        ctx = self._ctx
        if path == ctx.forward_auth_path and "x-forwarded-uri" in headers and "x-forwarded-method" in headers:
            path, _, query = headers["x-forwarded-uri"].partition("?")
            method = headers["x-forwarded-method"].upper()
            host = headers.get("x-forwarded-host", host)
        elif ctx.path_prefix and path.startswith(ctx.path_prefix):
            rest = path[len(ctx.path_prefix) :]
            if not rest or rest[0] == "/":
                path = rest or "/"
        return CheckInput(
            method=method,
            host=host,
            path=path or "/",
            query=query,
            headers=headers,
            request_id=headers.get(REQUEST_ID_HEADER, ""),
        )

    # -- responses in request order --------------------------------------------------------------------------
    def _respond(self, payload: bytes, *, close: bool) -> None:
        if self._pending:
            self._pending.append([payload, close, False])
            return
        self._write(payload, close)

    def _task_done(self, _task: asyncio.Task[Decision]) -> None:
        while self._pending:
            slot = self._pending[0]
            item, close, head = slot
            if isinstance(item, asyncio.Task):
                if not item.done():
                    return
                close = bool(close) or self._ctx.closing
                try:
                    payload = encode_decision(item.result(), head=bool(head), close=close)
                except BaseException:  # Pipeline.check never raises; a cancelled task means the peer left
                    payload = _INTERNAL_ERROR
                    close = True
            else:
                assert isinstance(item, bytes)
                payload = item
            self._pending.popleft()
            self._write(payload, bool(close))
            if self._transport is None:
                return

    def _write(self, payload: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or self._linger is not None:  # gone, or half-closed after its last answer
            return
        transport.write(payload)
        if close or (self._draining and not self._pending and not self._in_message):
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Half-close, then read and discard until the peer closes (or ``LINGER_S``).

        Closing with unread input makes the kernel send a reset, which can destroy the answer the peer has not
        read yet (a 400/431 sent while the client is still writing).
        """
        transport = self._transport
        if transport is None or self._linger is not None:
            return
        self._closing = True
        if transport.can_write_eof():
            transport.write_eof()
            self._linger = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)
        else:  # pragma: no cover - TCP transports can half-close
            transport.close()

    def _fail(self, payload: bytes) -> None:
        """Answer a broken request after the earlier ones, then close; later input is discarded."""
        self._in_message = False
        self._respond(payload, close=True)
        self._closing = True

    def _finish_after_pending(self) -> None:
        self._closing = True
        if not self._pending:
            self._close_gracefully()

    def time_out(self) -> None:
        """The request did not arrive whole in time: 408 for a started one (after the answers owed), then close."""
        self.waiting_since = None
        if self._in_message:
            self._fail(_REQUEST_TIMEOUT)
        else:
            self._finish_after_pending()

    def shutdown(self) -> None:
        """Graceful stop: close now when idle, else after the answers owed."""
        if not self._pending and not self._in_message:
            self._close_gracefully()
        else:
            self._draining = True

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class HttpListener:
    """The HTTP ext_authz server as ``meshgate.runtime`` sees it: a port and a graceful ``stop``."""

    def __init__(self, server: asyncio.Server, ctx: _Context) -> None:
        self.server = server
        self._ctx = ctx
        self.port = int(server.sockets[0].getsockname()[1])
        self._sweeper = Periodic(self._sweep, max(ctx.request_timeout_s / 4, 0.01), "extauthz-http-sweeper")
        self._sweeper.start()

    async def _sweep(self) -> None:
        self._ctx.drop_slow_requests()

    async def stop(self, grace_s: float) -> None:
        await self._sweeper.close()
        self.server.close()
        ctx = self._ctx
        ctx.closing = True
        for connection in list(ctx.connections):
            connection.shutdown()
        if ctx.connections:
            ctx.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.all_closed.wait(), grace_s)
        for connection in list(ctx.connections):
            connection.abort()
        await self.server.wait_closed()


async def start_http_listener(
    host: str,
    port: int,
    get_pipeline: Callable[[], Pipeline],
    *,
    path_prefix: str = "",
    forward_auth_path: str = "/forward-auth",
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> HttpListener:
    ctx = _Context(
        get_pipeline,
        path_prefix,
        forward_auth_path,
        max_header_bytes,
        max_body_bytes,
        request_timeout_s,
        max_connections,
    )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(ctx), host, port, reuse_address=True)
    return HttpListener(server, ctx)
