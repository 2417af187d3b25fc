"""Real redis-server processes for tests: standalone, a 3-master Cluster and a Sentinel set-up, on loopback.

Every server runs in its own temp dir without persistence (``--save "" --appendonly no``); every wait is bounded.
The session fixtures share one instance of each kind per test process (started on first use, stopped at exit), so
several test modules can import them and still talk to the same servers:

    from tests.support.redis_servers import redis_standalone_url  # noqa: F401  (pytest fixture)

- ``redis_standalone_url`` -> ``redis://127.0.0.1:PORT``
- ``redis_cluster_url``    -> ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``
- ``redis_sentinel_url``   -> ``redis+sentinel://127.0.0.1:S1/mymaster``
- ``redis_cluster_tls`` / ``redis_sentinel_tls``: the same topologies on TLS only, every server requiring a client
  certificate (mutual TLS) and a password; ``url`` is ``rediss+cluster://`` / ``rediss+sentinel://`` with the files.

Tests that kill or reconfigure a server start their own ``RedisServer`` (see ``stop()`` / ``start()``).
``paused()`` hangs one (SIGSTOP) for a block, for tests of deadlines.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
import redis

from tests.support.pki import TestCA
from tests.support.ports import free_port
from tests.support.procs import Proc, ProcessError

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
START_TIMEOUT = 20.0  # generous: a loaded 2-core machine; every loop below is bounded by it
_READY = r"Ready to accept connections"
_SENTINEL_READY = r"Sentinel ID is"


@dataclass(frozen=True)
class TlsFiles:
    """Server-side TLS material; clients verify against ``ca``.

    A server on TLS listens on TLS only, so its replication links and Cluster bus (and a sentinel's links to the
    master and replicas) use TLS too. ``client_cert``/``client_key``: the certificate the server presents on those
    outgoing links (and ``RedisServer.client()`` on its own); ``auth_clients="yes"`` makes every client present one
    signed by ``ca`` (mutual TLS; the outgoing links then need ``client_cert``)."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    auth_clients: str = "optional"

    @classmethod
    def issue(cls, ca: TestCA, *, auth_clients: str = "optional") -> TlsFiles:
        """A server certificate for 127.0.0.1 and a client certificate, both from ``ca``."""
        server = ca.server("redis-server")
        client = ca.spiffe_client("spiffe://test/redis/peer", stem="redis-peer")
        return cls(server.cert, server.key, ca.ca_file, client.cert, client.key, auth_clients)

    def settings(self, port: int) -> list[tuple[str, str]]:
        """redis-server settings (name, value): TLS only on ``port``, for clients, replication and the Cluster bus."""
        pairs = [("port", "0"), ("tls-port", str(port)), ("tls-cert-file", str(self.cert))]
        pairs += [("tls-key-file", str(self.key)), ("tls-ca-cert-file", str(self.ca))]
        pairs += [("tls-auth-clients", self.auth_clients), ("tls-replication", "yes"), ("tls-cluster", "yes")]
        if self.client_cert is not None and self.client_key is not None:
            pairs += [("tls-client-cert-file", str(self.client_cert)), ("tls-client-key-file", str(self.client_key))]
        return pairs

    def query(self) -> str:
        """The URL options that reach a server with these files: the CA, and the client certificate if it has one."""
        options = f"ca_cert={self.ca}"
        if self.client_cert is not None and self.client_key is not None:
            options += f"&cert={self.client_cert}&key={self.client_key}"
        return options


def _wait_until(check: Any, what: str, timeout: float = START_TIMEOUT) -> Any:
    """Poll ``check()`` until it returns something truthy; ProcessError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (redis.RedisError, OSError) as exc:
            last, result = exc, None
        if result:
            return result
        time.sleep(0.05)
    raise ProcessError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


class RedisServer:
    """One redis-server on 127.0.0.1; ``stop()`` then ``start()`` brings it back on the same port (empty)."""

    def __init__(
        self,
        *,
        password: str | None = None,
        tls: TlsFiles | None = None,
        extra_args: Sequence[str] = (),
        name: str = "redis",
        sentinel_config: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.extra_args = list(extra_args)
        self.name = name
        self.sentinel_config = sentinel_config  # lines of sentinel.conf (after "port"): run as a sentinel
        self.dir = Path(tempfile.mkdtemp(prefix=f"meshgate-{name}-"))
        self._proc: Proc | None = None

    def command(self) -> list[str]:
        if self.sentinel_config is not None:
            conf = self.dir / "sentinel.conf"  # sentinel rewrites its config file: it must be writable
            ports = [f"{name} {value}" for name, value in self.tls.settings(self.port)] if self.tls else []
            lines = [*(ports or [f"port {self.port}"]), "bind 127.0.0.1", f"dir {self.dir}", *self.sentinel_config]
            if self.password is not None:
                lines.append(f"requirepass {self.password}")  # the sentinel's own password
            conf.write_text("\n".join(lines) + "\n")
            return [REDIS_SERVER, str(conf), "--sentinel"]
        cmd = [REDIS_SERVER, "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "", "--appendonly", "no"]
        cmd += ["--protected-mode", "no", "--loglevel", "notice"]
        if self.sentinel_config is None:
            cmd += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        if self.tls is None:
            cmd += ["--port", str(self.port)]
        else:
            cmd += [arg for name, value in self.tls.settings(self.port) for arg in (f"--{name}", value)]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def start(self) -> RedisServer:
        if self.running:
            return self
        self._proc = Proc(self.command(), cwd=self.dir, name=self.name)
        try:
            ready = _SENTINEL_READY if self.sentinel_config is not None else _READY
            self._proc.wait_for_line(ready, timeout=START_TIMEOUT)
        except BaseException:
            self._proc.cleanup()
            self._proc = None
            raise
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default: the sudden failure tests want). Idempotent."""
        if self._proc is not None:
            self._proc.stop(timeout=5.0, sig=sig)
            self._proc.log_path.unlink(missing_ok=True)
            self._proc = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP the server for the block (a hung Redis: connections stay open, nothing answers), then SIGCONT."""
        assert self._proc is not None, "start the server first"
        pid = self._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if self.running:
                os.kill(pid, signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.proc.poll() is None

    def log(self) -> str:
        return self._proc.output() if self._proc is not None else ""

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def unix_url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        return f"unix://{auth}{self.socket_path}"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        if self.tls is None:
            return f"redis://{auth}127.0.0.1:{self.port}"
        return f"rediss://{auth}127.0.0.1:{self.port}?{self.tls.query()}"

    def client(self) -> redis.Redis:
        """A synchronous admin client (INFO, CONFIG, SCRIPT FLUSH, ...) for assertions."""
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls.ca)}
            if self.tls.client_cert is not None:
                tls |= {"ssl_certfile": str(self.tls.client_cert), "ssl_keyfile": str(self.tls.client_key)}
        return redis.Redis(port=self.port, password=self.password, socket_timeout=5.0, **tls)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def command_calls(client: redis.Redis, command: str) -> int:
    """How often ``command`` (e.g. "evalsha") ran since the last CONFIG RESETSTAT (from INFO commandstats)."""
    stats = client.info("commandstats")
    entry = stats.get(f"cmdstat_{command.lower()}")
    return int(entry["calls"]) if entry else 0


def commands_run(client: redis.Redis) -> set[str]:
    """The commands that ran since the last CONFIG RESETSTAT (``config`` and ``info`` among them: the reset and
    this very query)."""
    return {name.removeprefix("cmdstat_").split("|")[0] for name in client.info("commandstats")}


@pytest.fixture
def redis_tls(tmp_path: Path) -> Iterator[tuple[RedisServer, TestCA]]:
    """A throw-away redis-server on TLS with password ``pw``, and the test CA whose server certificate it uses."""
    ca = TestCA(tmp_path)
    files = ca.server()
    with RedisServer(tls=TlsFiles(files.cert, files.key, ca.ca_file), password="pw") as server:
        yield server, ca


class RedisCluster:
    """Three masters, no replicas, every slot covered; ``url`` lists all three nodes. With ``tls`` every node (and
    the Cluster bus) is on TLS only, and CLUSTER SLOTS names the TLS ports."""

    def __init__(self, masters: int = 3, *, password: str | None = None, tls: TlsFiles | None = None) -> None:
        self.password = password
        self.tls = tls
        # explicit bus ports: the default (port + 10000) overflows for high ephemeral ports
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [
            RedisServer(
                name=f"redis-cluster{i}",
                password=password,
                tls=tls,
                extra_args=[
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", "3000", "--cluster-port", str(bus)),
                ],
            )
            for i, bus in enumerate(self.bus_ports)
        ]

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            for node in self.nodes:
                with node.client() as client:
                    # every node must see all slots and every other node, or a MOVED could name an unknown node
                    _wait_until(lambda c=client: self._ready(c.cluster("INFO")), "cluster_state:ok")
        except BaseException:
            self.cleanup()
            raise
        return self

    def _ready(self, info: dict[str, Any]) -> bool:
        return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)

    def _create(self) -> None:
        """Assign slot ranges and MEET the nodes ourselves: no redis-cli needed, and no 1 s sleeps of its own."""
        count = len(self.nodes)
        first = self.nodes[0]
        for index, node in enumerate(self.nodes):
            low, high = index * 16384 // count, (index + 1) * 16384 // count - 1
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", low, high)
                if node is not first:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", first.port, self.bus_ports[0])
        with first.client() as client:
            client.execute_command("CLUSTER BUMPEPOCH")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        scheme = "redis+cluster" if self.tls is None else "rediss+cluster"
        query = "" if self.tls is None else f"?{self.tls.query()}"
        return f"{scheme}://{auth}" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes) + query

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


class RedisSentinel:
    """A master, one replica, and 1 (or 3) sentinels monitoring it as ``mymaster``. With ``tls`` every one of them
    is on TLS only: clients, replication and the sentinels' links to the master and replica."""

    MASTER_NAME = "mymaster"

    def __init__(
        self,
        sentinels: int = 1,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 1000,
        tls: TlsFiles | None = None,
    ) -> None:
        self.password = password  # the master's and replica's
        self.tls = tls
        self.sentinel_password = sentinel_password  # the sentinels' own (URL option sentinel_password)
        # no diskless-sync delay (5 s by default): the replica syncs at once
        self.master = RedisServer(
            name="redis-master", password=password, tls=tls, extra_args=["--repl-diskless-sync-delay", "0"]
        )
        replica_args = ["--replicaof", "127.0.0.1", str(self.master.port)]
        if password is not None:
            replica_args += ["--masterauth", password]
        self.replica = RedisServer(name="redis-replica", password=password, tls=tls, extra_args=replica_args)
        lines = [
            f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} {sentinels // 2 + 1}",
            f"sentinel down-after-milliseconds {self.MASTER_NAME} {down_after_ms}",
            f"sentinel failover-timeout {self.MASTER_NAME} 5000",
            f"sentinel parallel-syncs {self.MASTER_NAME} 1",
        ]
        if password is not None:
            lines.append(f"sentinel auth-pass {self.MASTER_NAME} {password}")
        self.sentinels = [
            RedisServer(name=f"redis-sentinel{i}", password=sentinel_password, tls=tls, sentinel_config=lines)
            for i in range(sentinels)
        ]

    def start(self) -> RedisSentinel:
        try:
            self.master.start()
            self.replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            with self.replica.client() as replica:
                _wait_until(lambda: b"master_link_status:up" in replica.execute_command("INFO replication"), "sync")
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    _wait_until(
                        lambda c=client: c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME),
                        "sentinel to know the master",
                    )
                    _wait_until(
                        lambda c=client: c.execute_command("SENTINEL REPLICAS", self.MASTER_NAME), "sentinel replicas"
                    )
        except BaseException:
            self.cleanup()
            raise
        return self

    def master_port(self) -> int:
        """The port of the master as the first sentinel sees it now."""
        with self.sentinels[0].client() as client:
            _host, port = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
        return int(port)

    def cleanup(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            server.cleanup()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        options = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password is not None else []
        if self.tls is not None:
            options.append(self.tls.query())
        scheme = "redis+sentinel" if self.tls is None else "rediss+sentinel"
        query = "?" + "&".join(options) if options else ""
        return f"{scheme}://{auth}{hosts}/{self.MASTER_NAME}{query}"

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


# One shared instance of each kind per process, so every module importing the fixtures reuses the same servers.
_shared: dict[type, RedisServer | RedisCluster | RedisSentinel] = {}
_shared_lock = threading.Lock()
SharedT = TypeVar("SharedT", RedisServer, RedisCluster, RedisSentinel)


def _shared_instance(kind: type[SharedT]) -> SharedT:
    """The process's one running ``kind``, started on first use; the test skips without redis-server."""
    _require_redis()
    with _shared_lock:
        made = _shared.get(kind)
        if made is None:
            made = kind()
            made.start()  # cached only once running: a failed start is retried by the next test
            _shared[kind] = made
        assert isinstance(made, kind)
        return made


@atexit.register
def _cleanup_shared() -> None:
    for instance in _shared.values():
        instance.cleanup()
    _shared.clear()


def _require_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_standalone() -> RedisServer:
    return _shared_instance(RedisServer)


@pytest.fixture(scope="session")
def redis_cluster() -> RedisCluster:
    return _shared_instance(RedisCluster)


@pytest.fixture(scope="session")
def redis_sentinel() -> RedisSentinel:
    return _shared_instance(RedisSentinel)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that stop and restart it (not the shared one)."""
    _require_redis()
    with RedisServer(name="redis-own") as server:
        yield server


@contextlib.contextmanager
def _tls_files() -> Iterator[TlsFiles]:
    """A fresh test CA in a temp folder (removed after the block), with a server and a client certificate; servers
    on these files require the client certificate (mutual TLS)."""
    with tempfile.TemporaryDirectory(prefix="meshgate-redis-pki-") as folder:
        yield TlsFiles.issue(TestCA(Path(folder)), auth_clients="yes")


@pytest.fixture(scope="session")
def redis_cluster_tls() -> Iterator[RedisCluster]:
    """A 3-master Cluster on TLS only (its bus too), mutual TLS, password ``c1uster-pw``; stopped after the session.
    ``url`` carries the CA and the client certificate; ``tls`` has the files."""
    _require_redis()
    with _tls_files() as tls, RedisCluster(password="c1uster-pw", tls=tls) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel_tls() -> Iterator[RedisSentinel]:
    """Master, replica and one sentinel on TLS only (replication and the sentinel's links too), mutual TLS; the
    master and replica require ``m4ster-pw``, the sentinel ``s3ntinel-pw``. Stopped after the session."""
    _require_redis()
    with _tls_files() as tls, RedisSentinel(password="m4ster-pw", sentinel_password="s3ntinel-pw", tls=tls) as made:
        yield made


@pytest.fixture(scope="session")
def redis_standalone_url(redis_standalone: RedisServer) -> str:
    return redis_standalone.url


@pytest.fixture(scope="session")
def redis_unix_url(redis_standalone: RedisServer) -> str:
    """The shared standalone server, on its unix socket."""
    return redis_standalone.unix_url


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisCluster) -> str:
    return redis_cluster.url


@pytest.fixture(scope="session")
def redis_sentinel_url(redis_sentinel: RedisSentinel) -> str:
    return redis_sentinel.url


__all__ = [
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "TlsFiles",
    "command_calls",
    "redis_cluster",
    "redis_cluster_tls",
    "redis_cluster_url",
    "redis_sentinel",
    "redis_sentinel_tls",
    "redis_sentinel_url",
    "redis_standalone",
    "redis_standalone_url",
]
