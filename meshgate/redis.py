"""One factory for Redis connections (standalone, Cluster, Sentinel; auth and TLS for each), shared by both services.

``connect()`` gives a ``RedisTarget``. Standalone and Sentinel targets carry two clients on one URL: ``resp``, the
lean pipelined client of ``meshgate.resp`` for the hot path (and readiness), and ``client``, a redis-py client for
anything else (admin commands, tools, tests). Neither connects before it is used. Cluster keeps redis-py's
``RedisCluster`` (``cluster``): its slot maps and MOVED/ASK handling are not worth rewriting for now.

URL formats (credentials percent-encoded; a bad URL raises ValueError with a message fit for the CLI):

    redis://[[user]:password@]host[:port][/db][?options]                  standalone (port 6379, db 0)
    rediss://...                                                          the same over TLS
    redis+cluster://[[user]:password@]host:port[,host:port...][?options]  Cluster; the nodes are seeds only
    rediss+cluster://...                                                  Cluster over TLS
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/master[/db][?options]
    rediss+sentinel://...                                                 Sentinel (port 26379), TLS everywhere
    unix://[[user]:password@]/path/to/redis.sock[?db=N]                   standalone on a unix socket (node-local
                                                                          Redis; envoyproxy's REDIS_SOCKET_TYPE=unix)

Options (query string):
    ca_cert=PATH  cert=PATH  key=PATH   TLS: CA bundle to verify the server, client cert + key (mutual TLS)
    check_hostname=true|false           TLS: verify the server's name (default true)
    sentinel_username=U  sentinel_password=P   Sentinel only: credentials of the sentinels themselves; the userinfo
                                        credentials are those of the master and replicas

Never log a URL as given: ``redact_url()`` masks the passwords.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from redis.asyncio import Redis, RedisCluster, Sentinel
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from meshgate.log import redact_url
from meshgate.resp import Address, RespClient, checked_timeout

Kind = Literal["standalone", "cluster", "sentinel"]

_SCHEMES: dict[str, tuple[Kind, bool]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
}
_DEFAULT_PORT = {"standalone": 6379, "cluster": 6379, "sentinel": 26379}
URL_SCHEMES = tuple(f"{scheme}://" for scheme in (*_SCHEMES, "unix"))  # every URL this module accepts starts so
_TLS_OPTIONS = frozenset({"ca_cert", "cert", "key", "check_hostname"})
_SENTINEL_OPTIONS = frozenset({"sentinel_username", "sentinel_password"})
# Idle connections are PINGed before reuse after this long, so a silently dropped one is replaced, not failed on.
_HEALTH_CHECK_INTERVAL_S = 30


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A parsed, validated Redis URL."""

    kind: Kind
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master: str = ""  # Sentinel: the monitored master's name
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    check_hostname: bool = True
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    socket_path: str = ""  # unix://: the socket's absolute path (hosts is empty then)


def _fail(url: str, message: str) -> ValueError:
    return ValueError(f"invalid Redis URL {redact_url(url)!r}: {message}")


def _parse_host(url: str, text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, close, after = text[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise _fail(url, f"bad IPv6 address {text!r}")
        port_text = after[1:]
    else:
        host, _colon, port_text = text.partition(":")
    if not host:
        raise _fail(url, f"missing host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(url, f"bad port {port_text!r} (1-65535)")
    return host, int(port_text)


def _parse_db(url: str, text: str) -> int:
    if not text.isdigit():
        raise _fail(url, f"database must be a number, got {text!r}")
    return int(text)


def _parse_bool(url: str, name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0"):
        return False
    raise _fail(url, f"option {name} must be true or false, got {text!r}")


def _parse_userinfo(url: str, userinfo: str) -> tuple[str | None, str | None]:
    user_text, colon, pass_text = userinfo.partition(":")
    username = unquote(user_text) or None
    password = unquote(pass_text) if colon else None
    if username is not None and password is None:
        raise _fail(url, "a user name needs a password (user:password@)")
    return username, password


def _parse_unix(url: str, rest: str) -> RedisUrl:
    """``unix://[[user]:password@]/absolute/path[?db=N]``."""
    rest, _q, query = rest.partition("?")
    userinfo, at, path = "", "", rest
    if not rest.startswith("/"):  # credentials end where the absolute path begins (a path may hold an @)
        userinfo, at, tail = rest.partition("@/")
        path = "/" + tail if at else rest
    username, password = _parse_userinfo(url, userinfo) if at else (None, None)
    if not path.startswith("/") or path == "/":
        raise _fail(url, "a unix socket needs an absolute path: unix:///path/to/redis.sock")
    options = _parse_options(url, query, frozenset({"db"}))
    db = _parse_db(url, options["db"]) if "db" in options else 0
    return RedisUrl(kind="standalone", hosts=(), username=username, password=password, db=db, socket_path=path)


def _parse_options(url: str, query: str, allowed: frozenset[str]) -> dict[str, str]:
    """The query string's options: each known, given once, with a value."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            raise _fail(url, f"unknown option {name!r} (known: {', '.join(sorted(allowed))})")
        if name in options:
            raise _fail(url, f"option {name!r} given twice")
        if not value:
            raise _fail(url, f"option {name!r} needs a value")
        options[name] = value
    return options


def parse_url(url: str) -> RedisUrl:
    """Validate ``url`` (formats in the module docstring); ValueError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or f"{scheme}://" not in URL_SCHEMES:
        raise _fail(url, f"scheme must be one of {', '.join(URL_SCHEMES)}")
    if "#" in rest:
        raise _fail(url, "fragments (#...) are not allowed")
    if scheme == "unix":
        return _parse_unix(url, rest)
    kind, tls = _SCHEMES[scheme]
    rest, _q, query = rest.partition("?")
    netloc, _slash, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username, password = _parse_userinfo(url, userinfo) if at else (None, None)
    if not hostlist:
        raise _fail(url, "missing host")
    hosts = tuple(_parse_host(url, item, _DEFAULT_PORT[kind]) for item in hostlist.split(","))
    if kind == "standalone" and len(hosts) > 1:
        raise _fail(url, "several hosts need redis+cluster:// or redis+sentinel://")

    db, master = 0, ""
    segments = path.split("/") if path else []
    if kind == "sentinel":
        if not segments or not segments[0]:
            raise _fail(url, "the master name is missing: redis+sentinel://host:port/MASTER[/db]")
        master = unquote(segments.pop(0))
    if segments and not segments[-1]:
        segments.pop()  # a trailing slash
    if kind == "cluster" and segments:
        raise _fail(url, "Redis Cluster has no databases: drop the path")
    if len(segments) > 1:
        raise _fail(url, f"unexpected path {path!r}")
    if segments:
        db = _parse_db(url, segments[0])

    options = _parse_options(url, query, _TLS_OPTIONS | (_SENTINEL_OPTIONS if kind == "sentinel" else frozenset()))
    if not tls and options.keys() & _TLS_OPTIONS:
        raise _fail(url, "TLS options need a rediss:// scheme")
    if ("cert" in options) != ("key" in options):
        raise _fail(url, "a client certificate needs both cert= and key=")
    return RedisUrl(
        kind=kind,
        hosts=hosts,
        tls=tls,
        username=username,
        password=password,
        db=db,
        master=master,
        ca_cert=options.get("ca_cert"),
        cert=options.get("cert"),
        key=options.get("key"),
        check_hostname=_parse_bool(url, "check_hostname", options.get("check_hostname", "true")),
        sentinel_username=options.get("sentinel_username"),
        sentinel_password=options.get("sentinel_password"),
    )


@dataclass(eq=False)
class RedisTarget:
    """What a backend talks to: ``resp`` + ``client`` (standalone, Sentinel) or ``cluster`` (Cluster)."""

    kind: Kind
    url: str  # redacted: safe to log
    client: Redis | None = None
    cluster: RedisCluster | None = None
    resp: RespClient | None = None

    async def ping(self) -> bool:
        """One PING (to every Cluster node; on the hot path's connection otherwise); False on any failure.

        The caller bounds the time."""
        try:
            if self.cluster is not None:
                return bool(await self.cluster.ping(target_nodes=RedisCluster.ALL_NODES))
            assert self.resp is not None
            return bool(await self.resp.execute("PING") == b"PONG")
        except Exception:  # readiness must answer, not raise
            return False

    async def close(self) -> None:
        if self.cluster is not None:
            await self.cluster.aclose()
        if self.client is not None:
            await self.client.aclose()
        if self.resp is not None:
            await self.resp.close()

    def __repr__(self) -> str:
        return f"RedisTarget({self.kind}, {self.url})"


class _Sentinel(Sentinel):
    """redis-py's Sentinel, whose discovery error names each sentinel by its address and what went wrong.

    redis-py's own names each by its client's repr: ~1.5 kB of connection options per sentinel, hiding the cause,
    and in redis-py 6.2 to 7.x with the sentinel password in clear text (redis/redis-py#3993)."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        failures: list[str] = []
        for index, sentinel in enumerate(self.sentinels):
            options = sentinel.connection_pool.connection_kwargs
            where = f"{options.get('host')}:{options.get('port')}"
            try:  # Any: redis-py 8.x types the reply as a dict or a list (RESP3), older ones leave it untyped
                masters: Any = await sentinel.sentinel_masters()
            except (RedisError, OSError) as error:
                failures.append(f"{where}: {type(error).__name__}: {error}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]  # ask this one first next time
                return str(state["ip"]), int(state["port"])
            failures.append(f"{where}: {'not a healthy master' if state else 'not monitored'}")
        raise MasterNotFoundError(f"no master {service_name!r} from the sentinels ({'; '.join(failures)})")


def _tls_kwargs(parsed: RedisUrl) -> dict[str, Any]:
    if not parsed.tls:
        return {}
    return {
        "ssl": True,
        "ssl_ca_certs": parsed.ca_cert,
        "ssl_certfile": parsed.cert,
        "ssl_keyfile": parsed.key,
        "ssl_check_hostname": parsed.check_hostname,
        "ssl_cert_reqs": "required",
    }


def ssl_context(parsed: RedisUrl) -> ssl.SSLContext | None:
    """The lean client's TLS context: the same options as redis-py's (server verified, optional client cert)."""
    if not parsed.tls:
        return None
    context = ssl.create_default_context(cafile=parsed.ca_cert)
    if parsed.cert is not None:
        context.load_cert_chain(parsed.cert, parsed.key)
    context.check_hostname = parsed.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def _resp(
    url: str, parsed: RedisUrl, address: Address | str | Callable[[], Awaitable[Address]], timeout_s: float
) -> RespClient:
    try:
        context = ssl_context(parsed)
    except (OSError, ssl.SSLError) as error:  # at start-up, not at the first request
        raise _fail(url, f"cannot load the TLS files: {error}") from None
    return RespClient(
        address,
        timeout_s=timeout_s,
        username=parsed.username,
        password=parsed.password,
        db=parsed.db,
        ssl_context=context,
    )


def connect(url: str, *, timeout_s: float) -> RedisTarget:
    """Build the clients for ``url``; no network I/O here (connections open on first use and reopen after failures;
    TLS files are read now, so a missing one fails at start-up).

    redis-py clients: every socket operation is bounded by ``timeout_s``; one immediate retry on a fresh connection
    replaces a pooled connection that died (e.g. Redis restarted) without failing the call. The lean client bounds
    its connects and each call by ``timeout_s`` (``meshgate.resp``).
    """
    checked_timeout(timeout_s)
    parsed = parse_url(url)
    common: dict[str, Any] = {
        "username": parsed.username,
        "password": parsed.password,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
        "retry": Retry(NoBackoff(), 1),
        **_tls_kwargs(parsed),
    }
    safe = redact_url(url)
    if parsed.kind == "cluster":
        nodes = [ClusterNode(host, port) for host, port in parsed.hosts]
        cluster = RedisCluster(startup_nodes=nodes, **common)
        return RedisTarget("cluster", safe, cluster=cluster)
    if parsed.kind == "sentinel":
        sentinel_kwargs: dict[str, Any] = {
            "username": parsed.sentinel_username,
            "password": parsed.sentinel_password,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            **_tls_kwargs(parsed),
        }
        # Any: redis-py before 8 leaves Sentinel.__init__ untyped, 8.x types it (no ignore fits both)
        sentinel_type: Any = _Sentinel
        sentinel = sentinel_type(list(parsed.hosts), sentinel_kwargs=sentinel_kwargs, db=parsed.db, **common)
        client = sentinel.master_for(parsed.master)

        async def master_address() -> Address:  # asked at every (re)connect, so a failover is followed
            host, port = await sentinel.discover_master(parsed.master)
            return str(host), int(port)

        return RedisTarget("sentinel", safe, client=client, resp=_resp(url, parsed, master_address, timeout_s))
    if parsed.socket_path:
        client = Redis(unix_socket_path=parsed.socket_path, db=parsed.db, **common)
        return RedisTarget("standalone", safe, client=client, resp=_resp(url, parsed, parsed.socket_path, timeout_s))
    host, port = parsed.hosts[0]
    client = Redis(host=host, port=port, db=parsed.db, **common)
    return RedisTarget("standalone", safe, client=client, resp=_resp(url, parsed, (host, port), timeout_s))
