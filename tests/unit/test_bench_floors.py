"""The bench's do-nothing HTTP floor, and the answer it can be given: extauthz's own, decided by the real pipeline."""

from __future__ import annotations

import asyncio

from bench.floors import _HTTP_OK, _HttpAllow
from bench.issuer import BenchIssuer


async def _ask(answer: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _HttpAllow(answer), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n" * 2)  # two requests, two answers
        got = await asyncio.wait_for(reader.readexactly(2 * len(answer)), 10)
        writer.close()
        return got
    finally:
        server.close()


def test_the_floor_answers_each_request_with_its_answer() -> None:  # sync: the issuer runs its own loop
    assert asyncio.run(_ask(_HTTP_OK)) == _HTTP_OK * 2
    with BenchIssuer() as issuer:
        answer = issuer.http_allow_answer().read_bytes()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nx-auth-subject: bench-user\r\n" in answer and b"\r\nx-meshgate-md-sub: bench-user\r\n" in answer
    assert asyncio.run(_ask(answer)) == answer * 2
