"""The local JWKS/OIDC server and the signing helpers: real keys, real HTTP on loopback, both run modes."""

import asyncio
import base64
import json
import socket
import urllib.error
import urllib.request

import jwt
import pytest

from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.signing import (
    SigningKey,
    generate_ec_key,
    generate_ed25519_key,
    generate_rsa_key,
    jwks_document,
    mint_hs_with_public_key,
    mint_token,
    mint_unsigned_token,
    public_jwk,
    tamper_claims,
    tamper_signature,
)

CLAIMS = {"iss": "https://issuer", "sub": "alice", "exp": 4_000_000_000}


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return generate_rsa_key("rsa-1")


def get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        for _ in range(100):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.URLError as error:
        return isinstance(error.reason, ConnectionRefusedError)
    return False


# -- signing ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "alg"), [(generate_rsa_key, "RS256"), (generate_ec_key, "ES256"), (generate_ed25519_key, "EdDSA")]
)
def test_minted_tokens_verify_with_the_public_jwk(make: object, alg: str) -> None:
    key = make()  # type: ignore[operator]
    assert key.alg == alg
    token = mint_token(key, key.kid, CLAIMS, alg=alg, headers={"typ": "JWT"})
    assert jwt.get_unverified_header(token)["kid"] == key.kid
    assert jwt.decode(token, jwt.PyJWK(public_jwk(key)), algorithms=[alg]) == CLAIMS


def test_mint_without_kid_and_with_a_secret() -> None:
    token = mint_token("s3cret-s3cret-s3cret-s3cret-s3cret", None, CLAIMS, alg="HS256")
    assert "kid" not in jwt.get_unverified_header(token)
    assert jwt.decode(token, "s3cret-s3cret-s3cret-s3cret-s3cret", algorithms=["HS256"])["sub"] == "alice"


def test_public_jwk_without_alg_and_jwks_document_of_dicts(rsa_key: SigningKey) -> None:
    jwk = public_jwk(rsa_key, include_alg=False)
    assert "alg" not in jwk
    assert jwk["kid"] == "rsa-1"
    assert "d" not in jwk  # never the private half
    assert jwks_document([jwk, rsa_key]) == {"keys": [jwk, rsa_key.public_jwk()]}


def test_bad_token_helpers(rsa_key: SigningKey) -> None:
    unsigned = mint_unsigned_token(CLAIMS, kid="rsa-1")
    assert unsigned.endswith(".")
    assert jwt.get_unverified_header(unsigned) == {"alg": "none", "typ": "JWT", "kid": "rsa-1"}
    assert jwt.get_unverified_header(mint_unsigned_token(CLAIMS)) == {"alg": "none", "typ": "JWT"}
    confused = mint_hs_with_public_key(rsa_key, CLAIMS)
    assert jwt.get_unverified_header(confused)["alg"] == "HS256"
    # pyjwt refuses a PEM as HMAC secret, so check the MAC by hand.
    head, body, signature = confused.split(".")
    import hashlib
    import hmac

    expected = hmac.new(rsa_key.public_pem(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=") == expected
    good = mint_token(rsa_key, rsa_key.kid, CLAIMS)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tamper_signature(good), rsa_key.private_key.public_key(), algorithms=["RS256"])
    forged = tamper_claims(good, sub="mallory")
    assert jwt.decode(forged, options={"verify_signature": False})["sub"] == "mallory"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, rsa_key.private_key.public_key(), algorithms=["RS256"])


# -- server, thread mode ------------------------------------------------------------------------------------
def test_sync_server_serves_discovery_and_jwks(rsa_key: SigningKey) -> None:
    with JwksServer([rsa_key]) as server:
        assert server.port > 0
        assert server.issuer == f"http://127.0.0.1:{server.port}"
        status, discovery = get(server.discovery_uri)
        assert status == 200
        assert discovery["issuer"] == server.issuer
        assert discovery["jwks_uri"] == server.jwks_uri
        status, jwks = get(server.jwks_uri)
        assert status == 200
        assert jwks == jwks_document([rsa_key])
        assert (server.discovery_fetches, server.jwks_fetches, server.requests) == (1, 1, 2)
        server.reset_counts()
        assert (server.discovery_fetches, server.jwks_fetches, server.requests) == (0, 0, 0)


def test_sync_server_rotates_fails_goes_down_and_comes_back(rsa_key: SigningKey) -> None:
    new_key = generate_ec_key("ec-2")
    with JwksServer([rsa_key]) as server:
        port = server.port
        server.rotate([new_key])
        assert get(server.jwks_uri)[1] == jwks_document([new_key])

        server.fail()
        assert get(server.jwks_uri)[0] == 503
        server.recover()
        assert get(server.jwks_uri)[0] == 200

        server.down()
        assert not server.is_up
        assert refused(server.jwks_uri)
        server.down()  # idempotent
        server.fail(500)
        server.up()  # also clears fail()
        server.up()  # idempotent
        assert server.is_up
        assert server.port == port
        assert get(server.jwks_uri)[0] == 200


def test_sync_server_odd_requests(rsa_key: SigningKey) -> None:
    with JwksServer([rsa_key]) as server:
        assert get(server.issuer + "/nope")[0] == 404
        assert get(server.jwks_uri + "?x=1")[0] == 200
        assert b" 405 " in raw_request(server.port, b"POST /jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 400 " in raw_request(server.port, b"garbage\r\n\r\n")
        assert raw_request(server.port, b"GET /jwks.json HTTP/1.1\r\n") == b""  # closed before the head ended
        server.jwks_override = b"not json"
        server.discovery_override = b"{}"
        assert raw_request(server.port, b"GET /jwks.json HTTP/1.1\r\n\r\n").endswith(b"not json")
        assert get(server.discovery_uri) == (200, {})


def test_sync_server_reports_bind_failures() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        server = JwksServer(port=taken.getsockname()[1])
        with pytest.raises(OSError, match="in use"), server:
            pass


# -- server, async mode -------------------------------------------------------------------------------------
async def test_async_server_down_and_up(rsa_key: SigningKey) -> None:
    async with JwksServer([rsa_key]) as server:
        assert (await asyncio.to_thread(get, server.jwks_uri))[0] == 200
        server.down()
        assert await asyncio.to_thread(refused, server.jwks_uri)
        server.up()
        # Listening at once; served as soon as this loop runs the listener task.
        assert (await asyncio.to_thread(get, server.jwks_uri))[0] == 200
        server.down()
        server.up()
        server.down()  # down again before the listener task ran
        await asyncio.sleep(0)
        assert not server.is_up


async def test_async_server_stop_cancels_slow_answers(rsa_key: SigningKey) -> None:
    server = await JwksServer([rsa_key]).start()
    server.delay_s = 30
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /jwks.json HTTP/1.1\r\n\r\n")
    await writer.drain()
    for _ in range(200):  # bounded wait until the server holds the request
        if server.requests:
            break
        await asyncio.sleep(0.01)
    await server.stop()
    assert await reader.read() == b""
    writer.close()
