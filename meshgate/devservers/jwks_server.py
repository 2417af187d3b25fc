"""A local JWKS/OIDC issuer on 127.0.0.1 for tests, the demo and the bench.

Serves ``/.well-known/openid-configuration`` and ``/jwks.json`` over plain HTTP/1.1 (one request per connection),
and ``POST /introspect`` (RFC 7662, HTTP Basic client authentication) for the opaque tokens it was told about with
``grant``. It can misbehave on demand: ``rotate`` the keys, go ``down`` (connection refused) or ``fail`` (503), and come
back ``up`` on the same port. It counts what it served, so tests can assert on fetches.

Two ways to run it:

* ``async with JwksServer(keys) as server`` (or ``await start()`` / ``await stop()``) on the caller's event loop;
* ``with JwksServer(keys) as server`` from sync code: it runs on its own event loop in a background thread, so
  it also serves other processes (an extauthz subprocess, Envoy) while the caller blocks.

All control methods are synchronous and safe to call from either side.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote_plus

from meshgate.devservers.signing import SigningKey, jwks_document

T = TypeVar("T")

_MAX_HEAD = 16 * 1024
_DISCOVERY_PATH = "/.well-known/openid-configuration"
_JWKS_PATH = "/jwks.json"
_INTROSPECTION_PATH = "/introspect"
_MAX_BODY = 64 * 1024


class JwksServer:
    def __init__(
        self,
        keys: Iterable[SigningKey | Mapping[str, Any]] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls  # serve https with this server context
        self._jwks_body = b""
        self.rotate(keys)
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.requests = 0
        self.fail_status = 0  # non-zero: answer every request with this status
        self.delay_s = 0.0  # answer this much later (for timeout tests)
        self.cache_control = "max-age=300"  # what every answer says (tests of refresh timing change it)
        self.jwks_override: bytes | None = None  # serve this body instead of the key set (garbage tests)
        self.discovery_override: bytes | None = None
        self.introspection_client = ("meshgate", "introspection-secret")  # the client allowed to introspect
        self.introspections = 0
        self._granted: dict[str, dict[str, Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._listening = False

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + _JWKS_PATH

    @property
    def discovery_uri(self) -> str:
        return self.issuer + _DISCOVERY_PATH

    @property
    def introspection_endpoint(self) -> str:
        return self.issuer + _INTROSPECTION_PATH

    # -- behaviour -------------------------------------------------------------------------------------------
    def rotate(self, keys: Iterable[SigningKey | Mapping[str, Any]]) -> None:
        """Replace the whole key set (keep the old key in ``keys`` for an overlapping rotation)."""
        self._jwks_body = json.dumps(jwks_document(keys)).encode()

    def grant(self, token: str, claims: Mapping[str, Any]) -> None:
        """Introspection answers ``token`` as active with ``claims`` (until ``revoke``)."""
        self._granted[token] = {"active": True, **claims}

    def revoke(self, token: str) -> None:
        self._granted.pop(token, None)

    def fail(self, status: int = 503) -> None:
        """Keep accepting connections but answer every request with ``status``."""
        self.fail_status = status

    def recover(self) -> None:
        """Undo ``fail``."""
        self.fail_status = 0

    def down(self) -> None:
        """Close the listener: clients get connection refused until ``up``."""
        self._on_loop(self._close_listener)

    def up(self) -> None:
        """Listen again on the same port (and stop failing)."""
        self.fail_status = 0
        if not self._listening:
            sock = self._bind()  # listening right away: connections queue until the loop serves them
            self._on_loop(lambda: self._serve(sock))

    @property
    def is_up(self) -> bool:
        return self._listening

    def reset_counts(self) -> None:
        self.jwks_fetches = self.discovery_fetches = self.requests = self.introspections = 0

    # -- async lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> JwksServer:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(self._protocol_factory, sock=self._bind(), ssl=self.tls)
        self._listening = True
        return self

    async def stop(self) -> None:
        self._close_listener()
        for task in list(self._serving):
            task.cancel()
        if self._serving:
            await asyncio.gather(*self._serving, return_exceptions=True)

    async def __aenter__(self) -> JwksServer:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- sync lifecycle: own loop in a background thread ------------------------------------------------------
    def __enter__(self) -> JwksServer:
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)

            async def boot() -> None:
                await self.start()

            try:
                loop.run_until_complete(boot())
            except BaseException as error:  # report start-up failures to the caller
                started.set_exception(error)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="jwks-server", daemon=True)
        self._thread.start()
        started.result(timeout=10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        self._thread = None

    # -- internals --------------------------------------------------------------------------------------------
    def _on_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop: directly when already there (or not started), else via the thread."""
        loop = self._loop
        if loop is None or self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as error:
                done.set_exception(error)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=10)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    def _serve(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._listening = True
        task = self._loop.create_task(self._start_serving(sock))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _start_serving(self, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            server = await self._loop.create_server(self._protocol_factory, sock=sock, ssl=self.tls)
        except BaseException:
            sock.close()
            raise
        if self._listening:
            self._server = server
        else:  # went down again before the listener was ready
            server.close()

    def _close_listener(self) -> None:
        self._listening = False
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def _protocol_factory(self) -> asyncio.Protocol:
        reader = asyncio.StreamReader(limit=_MAX_HEAD)
        return asyncio.StreamReaderProtocol(reader, self._handle_connection)

    async def _handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._serving.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            status, body = (413, b'{"error":"too large"}') if length > _MAX_BODY else (0, b"")
            if not status:
                status, body = self._answer(head, await reader.readexactly(length))
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: {self.cache_control}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            if task is not None:
                self._serving.discard(task)
            writer.close()

    def _answer(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.requests += 1
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return 400, b'{"error":"bad request"}'
        method, target = parts[0], parts[1].split("?", 1)[0]
        if self.fail_status:
            return self.fail_status, b'{"error":"unavailable"}'
        if target == _INTROSPECTION_PATH and method == "POST":
            return self._introspect(head, body)
        if method not in ("GET", "HEAD"):
            return 405, b'{"error":"method not allowed"}'
        if target == _JWKS_PATH:
            self.jwks_fetches += 1
            return 200, self._jwks_body if self.jwks_override is None else self.jwks_override
        if target == _DISCOVERY_PATH:
            self.discovery_fetches += 1
            if self.discovery_override is not None:
                return 200, self.discovery_override
            document = {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_uri,
                "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
                "introspection_endpoint": self.introspection_endpoint,
            }
            return 200, json.dumps(document).encode()
        return 404, b'{"error":"not found"}'

    def _introspect(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if _basic_credentials(head) != self.introspection_client:
            return 401, b'{"error":"invalid_client"}'
        self.introspections += 1
        token = "".join(parse_qs(body.decode("latin-1")).get("token", []))
        return 200, json.dumps(self._granted.get(token, {"active": False})).encode()


def _basic_credentials(head: bytes) -> tuple[str, str] | None:
    """The client id and secret of the one ``Authorization: Basic`` header, decoded as RFC 6749 2.3.1 says
    (base64 of the form-urlencoded id and secret, joined by a colon)."""
    lines = head.decode("latin-1").split("\r\n")[1:]
    given = [line.split(":", 1)[1].split() for line in lines if line.lower().startswith("authorization:")]
    if len(given) != 1 or len(given[0]) != 2 or given[0][0].lower() != "basic":
        return None
    try:
        client_id, sep, secret = base64.b64decode(given[0][1], validate=True).decode().partition(":")
    except ValueError:
        return None
    return (unquote_plus(client_id), unquote_plus(secret)) if sep else None


def _content_length(head: bytes) -> int:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            return int(value.strip())
    return 0
