"""meshgate.redis: URL parsing for every scheme, redaction, and real connections (auth, TLS, Cluster, Sentinel)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster

from meshgate.redis import RedisUrl, connect, parse_url, ssl_context
from tests.support.pki import TestCA
from tests.support.redis_servers import (  # noqa: F401  (pytest fixtures)
    RedisServer,
    TlsFiles,
    redis_cluster,
    redis_cluster_url,
    redis_sentinel,
    redis_sentinel_url,
    redis_tls,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisUrl("standalone", (("localhost", 6379),))),
        ("redis://10.0.0.1:7000/3", RedisUrl("standalone", (("10.0.0.1", 7000),), db=3)),
        ("redis://:s3cr%40t@h:1/", RedisUrl("standalone", (("h", 1),), password="s3cr@t")),
        ("redis://alice:pw@h", RedisUrl("standalone", (("h", 6379),), username="alice", password="pw")),
        ("redis://[::1]:6380", RedisUrl("standalone", (("::1", 6380),))),
        (
            "rediss://h:6380?ca_cert=/ca.pem&cert=/c.pem&key=/k.pem&check_hostname=false",
            RedisUrl(
                "standalone",
                (("h", 6380),),
                tls=True,
                ca_cert="/ca.pem",
                cert="/c.pem",
                key="/k.pem",
                check_hostname=False,
            ),
        ),
        (
            "redis+cluster://:pw@a:7000,b:7001",
            RedisUrl("cluster", (("a", 7000), ("b", 7001)), password="pw"),
        ),
        ("rediss+cluster://a:7000", RedisUrl("cluster", (("a", 7000),), tls=True)),
        (
            "redis+sentinel://:pw@s1,s2:5000/mymaster/2?sentinel_password=sp",
            RedisUrl(
                "sentinel",
                (("s1", 26379), ("s2", 5000)),
                password="pw",
                db=2,
                master="mymaster",
                sentinel_password="sp",
            ),
        ),
        (
            "rediss+sentinel://s1/m?ca_cert=/ca",
            RedisUrl("sentinel", (("s1", 26379),), tls=True, master="m", ca_cert="/ca"),
        ),
        ("unix:///run/redis.sock", RedisUrl("standalone", (), socket_path="/run/redis.sock")),
        ("UNIX:///r.sock?db=2", RedisUrl("standalone", (), db=2, socket_path="/r.sock")),
        ("unix:///run/a@b/r.sock", RedisUrl("standalone", (), socket_path="/run/a@b/r.sock")),
        ("unix://:pw@/run/a@b/r.sock", RedisUrl("standalone", (), password="pw", socket_path="/run/a@b/r.sock")),
        (
            "unix://alice:p%40w@/var/run/redis/redis.sock",
            RedisUrl("standalone", (), username="alice", password="p@w", socket_path="/var/run/redis/redis.sock"),
        ),
    ],
)
def test_parse_url_accepts_every_scheme(url: str, expected: RedisUrl) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memcached://h", "scheme must be one of"),
        ("localhost:6379", "scheme must be one of"),
        ("redis://", "missing host"),
        ("redis://:pw@", "missing host"),
        ("redis://h:0", "bad port"),
        ("redis://h:99999", "bad port"),
        ("redis://h:abc", "bad port"),
        ("redis://[::1", "bad IPv6"),
        ("redis://h/x", "database must be a number"),
        ("redis://h/1/2", "unexpected path"),
        ("redis://a:1,b:2", "several hosts need"),
        ("redis+cluster://a:1/0", "Cluster has no databases"),
        ("redis+sentinel://s1:26379", "master name is missing"),
        ("redis+sentinel://s1:26379/", "master name is missing"),
        ("redis://h?ca_cert=/x", "TLS options need a rediss://"),
        ("rediss://h?cert=/c.pem", "needs both cert= and key="),
        ("rediss://h?colour=blue", "unknown option 'colour'"),
        ("redis://h?sentinel_password=x", "unknown option"),
        ("rediss://h?ca_cert=", "needs a value"),
        ("rediss://h?ca_cert=/a&ca_cert=/b", "given twice"),
        ("rediss://h?check_hostname=maybe", "true or false"),
        ("redis://alice@h", "needs a password"),
        ("redis://h#frag", "fragments"),
        ("unix://redis.sock", "absolute path"),
        ("unix:///", "absolute path"),
        ("unix://:pw@", "absolute path"),
        ("unix:///r.sock?ca_cert=/x", "unknown option 'ca_cert'"),
        ("unix:///r.sock?db=x", "database must be a number"),
        ("unix://alice@/r.sock", "needs a password"),
        ("unix:///r.sock#f", "fragments"),
    ],
)
def test_parse_url_rejects_bad_urls_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis URL") as info:
        parse_url(url)
    assert message in str(info.value)


def test_errors_and_reprs_never_show_passwords() -> None:
    with pytest.raises(ValueError, match="bad port") as info:
        parse_url("redis://:hunter2@h:99999")
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(parse_url("redis://:hunter2@h"))
    target = connect("redis+sentinel://u:hunter2@s/m?sentinel_password=topsecret", timeout_s=0.1)
    assert "hunter2" not in repr(target)
    assert "topsecret" not in repr(target)


def test_connect_validates_timeout_and_builds_the_right_client() -> None:
    with pytest.raises(ValueError, match="timeout"):
        connect("redis://h", timeout_s=0)
    standalone = connect("redis://h:1/2", timeout_s=0.25)
    assert isinstance(standalone.client, Redis)
    assert standalone.cluster is None
    kwargs = standalone.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["db"] == 2
    assert standalone.resp is not None  # the lean client for the hot path, on the same URL
    assert standalone.resp.timeout_s == 0.25
    cluster = connect("redis+cluster://a:1,b:2", timeout_s=0.25)
    assert isinstance(cluster.cluster, RedisCluster)
    assert cluster.client is None
    assert cluster.resp is None  # Cluster stays on redis-py


def test_tls_files_are_read_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load the TLS files") as info:
        connect(f"rediss://:hunter2@h?ca_cert={tmp_path / 'missing.pem'}", timeout_s=1.0)
    assert "hunter2" not in str(info.value)
    ca = TestCA(tmp_path)
    context = ssl_context(parse_url(f"rediss://h?ca_cert={ca.ca_file}&check_hostname=false"))
    assert context is not None
    assert not context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert ssl_context(parse_url("redis://h")) is None


async def test_tls_with_password_and_client_cert(redis_tls: tuple[RedisServer, TestCA]) -> None:  # noqa: F811
    server, ca = redis_tls
    client_files = ca.spiffe_client("spiffe://test/ns/default/sa/ratelimit")
    url = f"rediss://:pw@127.0.0.1:{server.port}?ca_cert={ca.ca_file}&cert={client_files.cert}&key={client_files.key}"
    target = connect(url, timeout_s=2.0)
    try:
        assert await target.ping()
    finally:
        await target.close()


async def test_tls_rejects_an_unknown_ca_and_a_wrong_password(
    redis_tls: tuple[RedisServer, TestCA],  # noqa: F811
    tmp_path: Path,
) -> None:
    server, _ca = redis_tls
    (tmp_path / "other").mkdir()
    other = TestCA(tmp_path / "other")
    assert server.tls is not None
    for url in (
        f"rediss://:pw@127.0.0.1:{server.port}?ca_cert={other.ca_file}",
        f"rediss://:wrong@127.0.0.1:{server.port}?ca_cert={server.tls.ca}",
    ):
        target = connect(url, timeout_s=2.0)
        try:
            assert not await target.ping()
        finally:
            await target.close()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_password_auth_standalone(transport: str) -> None:
    with RedisServer(password="s3cret") as server:
        address = f"127.0.0.1:{server.port}" if transport == "tcp" else f"{server.socket_path}"
        scheme = "redis://" if transport == "tcp" else "unix://"
        good = connect(f"{scheme}:s3cret@{address}", timeout_s=2.0)
        bad = connect(f"{scheme}{address}", timeout_s=2.0)
        try:
            assert await good.ping()
            assert not await bad.ping()
            assert good.client is not None
            assert await good.client.ping()  # redis-py's client on the same URL
        finally:
            await good.close()
            await bad.close()


async def test_cluster_and_sentinel_targets_answer(redis_cluster_url: str, redis_sentinel_url: str) -> None:  # noqa: F811
    for url in (redis_cluster_url, redis_sentinel_url):
        target = connect(url, timeout_s=2.0)
        try:
            assert await target.ping(), target
        finally:
            await target.close()
