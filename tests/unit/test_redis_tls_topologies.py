"""Redis Cluster and Sentinel over TLS, on real redis-server processes (tests/support/redis_servers.py).

Every server listens on TLS only, requires a client certificate (mutual TLS) and a password; the Cluster's bus and
the Sentinel set-up's replication and sentinel links run on TLS too. The rate-limit backend counts exactly through
each, reaching nodes it only learns of from the server (the Cluster's other masters from CLUSTER SLOTS, the master
from the sentinel) with the URL's TLS options. A missing client certificate and an unknown CA are refused as
BackendUnavailable, with a short message naming the cause and no password.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from redis.crc import key_slot

from meshgate.redis import connect
from ratelimit.backends.base import BackendUnavailable, Hit
from ratelimit.backends.redis import RedisBackend
from ratelimit.model import Algorithm, Limit, Unit
from tests.support.pki import TestCA
from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
    RedisCluster,
    RedisSentinel,
    redis_cluster_tls,
    redis_sentinel_tls,
)

TIMEOUT_S = 2.0  # generous: a loaded 2-core machine; a refusal comes at once (the handshake fails)
NOW = 1_700_000_000.25  # injected clock
ALGORITHMS = tuple(Algorithm)
CLUSTER_SECRET = "c1uster-pw"
SENTINEL_SECRETS = ("m4ster-pw", "s3ntinel-pw")


def _hit(key: str, algorithm: Algorithm, limit: int = 3) -> Hit:
    return Hit(key, Limit(limit, Unit.MINUTE, algorithm=algorithm), 1)


async def _counts_exactly(backend: RedisBackend, keys: list[str]) -> None:
    """Per key and algorithm, a limit of 3: three requests pass, the fourth is over."""
    for key in keys:
        for algorithm in ALGORITHMS:
            hit = _hit(f"{key}:{algorithm.value}", algorithm)
            overs = [(await backend.hit([hit], NOW))[0].over for _ in range(4)]
            assert overs == [False, False, False, True], (key, algorithm)


def _without_client_cert(url: str) -> str:
    return re.sub(r"&cert=[^&]*&key=[^&]*", "", url)


def _with_ca(url: str, ca_file: Path) -> str:
    return re.sub(r"ca_cert=[^&]*", f"ca_cert={ca_file}", url)


async def _refused(url: str, secrets: tuple[str, ...]) -> str:
    """A backend on ``url`` fails as BackendUnavailable naming none of ``secrets`` and answers not ready; the
    message."""
    backend = RedisBackend.from_url(url, timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await backend.hit([_hit(f"mgtls:{{{uuid.uuid4().hex}}}", Algorithm.TOKEN_BUCKET)], NOW)
        assert not await backend.ping()
    finally:
        await backend.close()
    message = str(caught.value)
    assert not any(secret in message for secret in secrets), message
    return message


def _other_ca(tmp_path: Path) -> Path:
    return TestCA(tmp_path, name="some other CA").ca_file


def _key_per_node(cluster: RedisCluster) -> list[str]:
    """A fresh counter key in a slot of each master, in node order (slots were assigned in equal ranges)."""
    run, count = uuid.uuid4().hex[:8], len(cluster.nodes)
    keys: list[str] = []
    for index in range(count):
        low, high = index * 16384 // count, (index + 1) * 16384 // count - 1
        tags = (f"{run}-{index}-{n}" for n in range(100_000))
        keys.append(f"mgtls:{{{next(tag for tag in tags if low <= key_slot(tag.encode()) <= high)}}}")
    return keys


async def test_cluster_counts_on_every_node_over_mutual_tls_from_one_seed(
    redis_cluster_tls: RedisCluster,  # noqa: F811
) -> None:
    cluster = redis_cluster_tls
    seed = cluster.nodes[0].port
    # only the first node in the URL: the other two are known from CLUSTER SLOTS, and take the same TLS options
    url = re.sub(r"@[^?]*\?", f"@127.0.0.1:{seed}?", cluster.url)
    assert url.startswith("rediss+cluster://") and url.count("127.0.0.1:") == 1
    keys = _key_per_node(cluster)
    backend = RedisBackend.from_url(url, timeout_s=TIMEOUT_S)
    try:
        await _counts_exactly(backend, keys)
        # one request across the three nodes' slots: one script call per slot, in parallel
        spread = [_hit(f"{key}:spread", Algorithm.TOKEN_BUCKET, limit=2) for key in keys]
        assert [[o.over for o in await backend.hit(spread, NOW)] for _ in range(3)] == [
            [False] * 3,
            [False] * 3,
            [True] * 3,
        ]
        assert await backend.ping()  # PING to every node
    finally:
        await backend.close()
    for node, key in zip(cluster.nodes, keys, strict=True):  # each node holds its own key's counters
        with node.client() as admin:
            assert admin.exists(f"{key}:token_bucket"), node.port


async def test_sentinel_counts_over_mutual_tls_to_the_sentinel_and_the_master(
    redis_sentinel_tls: RedisSentinel,  # noqa: F811
) -> None:
    sentinels = redis_sentinel_tls
    assert sentinels.url.startswith("rediss+sentinel://")
    key = f"mgtls:{{{uuid.uuid4().hex}}}"
    backend = RedisBackend.from_url(sentinels.url, timeout_s=TIMEOUT_S)
    try:
        # fixed_window goes by the MULTI fast path, the others by the script: both on the lean client's TLS
        await _counts_exactly(backend, [key])
        assert await backend.ping()
    finally:
        await backend.close()
    with sentinels.master.client() as master:
        assert master.exists(f"{key}:token_bucket")
    target = connect(sentinels.url, timeout_s=TIMEOUT_S)  # redis-py's client on the same URL finds the master too
    try:
        assert target.client is not None
        assert await target.client.incr(f"{key}:redis-py") == 1
    finally:
        await target.close()


async def test_cluster_refuses_a_missing_client_cert_and_an_unknown_ca(
    redis_cluster_tls: RedisCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = redis_cluster_tls.url
    await _refused(_without_client_cert(url), (CLUSTER_SECRET,))
    message = await _refused(_with_ca(url, _other_ca(tmp_path)), (CLUSTER_SECRET,))
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert re.search(r"127\.0\.0\.1:\d+", message), message


async def test_sentinel_refuses_a_missing_client_cert_and_an_unknown_ca_in_a_short_message(
    redis_sentinel_tls: RedisSentinel,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The message names the sentinel by its address and the cause, not by redis-py's repr of its client: that is
    ~1.5 kB long, and in redis-py 6.2 to 7.x spells out the sentinel password (redis/redis-py#3993)."""
    sentinels = redis_sentinel_tls
    sentinel = f"127.0.0.1:{sentinels.sentinels[0].port}"
    for url, cause in (
        (_without_client_cert(sentinels.url), ""),
        (_with_ca(sentinels.url, _other_ca(tmp_path)), "CERTIFICATE_VERIFY_FAILED"),
    ):
        message = await _refused(url, SENTINEL_SECRETS)
        assert "mymaster" in message and sentinel in message and cause in message, message
        assert "redis.asyncio" not in message and len(message) < 400, message
        target = connect(url, timeout_s=TIMEOUT_S)  # redis-py's client: the same message
        try:
            assert target.client is not None
            with pytest.raises(Exception, match="mymaster") as caught:
                await target.client.ping()
            assert sentinel in str(caught.value) and "redis.asyncio" not in str(caught.value)
            assert not any(secret in str(caught.value) for secret in SENTINEL_SECRETS)
        finally:
            await target.close()
