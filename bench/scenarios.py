"""The scenario table. Adding a scenario = one entry in SCENARIOS (and its name in DEFAULT if it should run by
default): the Envoy template, the scenario it is compared with (``reference``), the services it runs (each given
the port the harness picked and the run's context, and the template placeholder that receives that port), and the
request it sends.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
POLICY = BENCH_DIR / "policy-20-rules.yaml"
POLICY_ISSUER = "http://127.0.0.1/bench"  # placeholder in POLICY, replaced by bench/issuer.py at run time
REQUEST_PATH = "/api/v1/items/42"  # admitted by POLICY's rule 15 (items-read); the extauthz scenarios send it
RATELIMIT_CONFIG = BENCH_DIR / "ratelimit"  # descriptor config dir (domain "bench"), limits never reached
RATELIMIT_DOMAIN = "bench"
# Through envoy/ratelimit.yaml this request carries 3 descriptors: (generic_key=api), (user=bench-user),
# (path=reports) (the template's path action matches the /reports prefix).
RATELIMIT_PATH = "/reports/2026/11"
RATELIMIT_HEADERS: Mapping[str, str] = {"x-user": "bench-user"}


@dataclass(frozen=True)
class RunContext:
    """What one bench invocation sets up once for all scenarios: the policy, request headers, a Redis."""

    policy: Path = POLICY
    auth_headers: Mapping[str, str] = field(default_factory=dict)  # the token, minted once per run
    redis_url: str = ""  # the bench's redis-server, when a scenario needs one
    redis_pid: int = 0  # its process (its CPU counts for the scenarios that use it)
    http_answer: Path | None = None  # a file with extauthz's HTTP allow answer to the bench request
    redis_unix_url: str = ""  # the same redis-server over its unix socket


Command = Callable[[int, RunContext], list[str]]  # (port, context) -> argv


@dataclass(frozen=True)
class Service:
    """One process behind Envoy; its port fills the template placeholder ``port_key``."""

    port_key: str  # "authz_port" | "ratelimit_port"
    command: Command
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment


def _auth_headers(ctx: RunContext) -> Mapping[str, str]:
    return ctx.auth_headers


def _ratelimit_headers(ctx: RunContext) -> Mapping[str, str]:
    return RATELIMIT_HEADERS


@dataclass(frozen=True)
class Scenario:
    name: str
    template: str  # envoy/<template>.yaml; rendered with listen_port, upstream_port, each service's port, values
    # The scenario this one is compared with: ratios of added latency (over BASELINE) and of saturation rps.
    # None = no ratio (BASELINE itself; a reference of BASELINE gives saturation ratio and added latency only).
    reference: str | None = None
    services: tuple[Service, ...] = ()  # run on the service core, in this order
    headers: Callable[[RunContext], Mapping[str, str]] = _auth_headers
    path: str = REQUEST_PATH
    values: Mapping[str, object] = field(default_factory=dict)  # extra template placeholders
    needs_issuer: bool = True  # the run starts the bench JWKS issuer (mints the token) and renders the policy
    needs_redis: bool = False  # the run starts a redis-server (ctx.redis_url) on the service core
    # Envoy counters that must be > 0 after the first request: proof the filter really called the service
    # (the ratelimit filter fails open, so a broken service would otherwise look fast).
    expect_stats: tuple[str, ...] = ()


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _floor(kind: str, *options: str) -> Command:
    return lambda port, ctx: _py("bench.floors", kind, "--port", str(port), *options)


def _floor_http_answer(port: int, ctx: RunContext) -> list[str]:
    """The HTTP floor answering with extauthz's own allow bytes: what Envoy's handling of that answer costs."""
    if ctx.http_answer is None:
        raise RuntimeError("floor-http-answer needs the run's extauthz answer (RunContext.http_answer)")
    return _py("bench.floors", "http", "--port", str(port), "--answer", str(ctx.http_answer))


def _meshgate_extauthz(transport: str) -> Command:
    """``meshgate serve extauthz`` serving the rendered bench policy on ``port`` for one transport."""

    def command(port: int, ctx: RunContext) -> list[str]:
        grpc_port = str(port) if transport == "grpc" else "0"  # gRPC cannot be turned off: 0 = a free, idle port
        http_port = str(port) if transport == "http" else "-1"
        return _py(
            "meshgate", "serve", "extauthz", "--config", str(ctx.policy), "--grpc-port", grpc_port,
            "--http-port", http_port, "--admin-port", "-1", "--log-level", "warning",
        )  # fmt: skip

    return command


def _meshgate_ratelimit(backend: str) -> Command:
    """``meshgate serve ratelimit`` with the bench descriptors; backend "memory", or "redis" / "redis-unix" (the
    bench's server over TCP or over its unix socket)."""

    def command(port: int, ctx: RunContext) -> list[str]:
        url = {"redis": ctx.redis_url, "redis-unix": ctx.redis_unix_url}.get(backend, backend)
        return _py(
            "meshgate", "serve", "ratelimit", "--config", str(RATELIMIT_CONFIG), "--backend", url,
            "--grpc-port", str(port), "--admin-port", "-1", "--log-level", "warning",
        )  # fmt: skip

    return command


BASELINE = "passthrough"
_RL_OK = ("cluster.upstream.ratelimit.ok",)
_AUTHZ_OK = ("http.ingress.ext_authz.ok",)


def _ratelimit(name: str, reference: str, command: Command, *, redis: bool = False) -> Scenario:
    return Scenario(
        name, "ratelimit", reference, (Service("ratelimit_port", command),), headers=_ratelimit_headers,
        path=RATELIMIT_PATH, values={"domain": RATELIMIT_DOMAIN}, needs_issuer=False, needs_redis=redis,
        expect_stats=_RL_OK,
    )  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("passthrough", "passthrough", needs_issuer=False),
        Scenario("floor-grpc", "extauthz-grpc", "floor-grpc", (Service("authz_port", _floor("grpc")),)),
        # The gRPC floor with meshgate's runtime tuning (helper threads as SCHED_BATCH): what that tuning alone gives.
        Scenario(
            "floor-grpc-batch",
            "extauthz-grpc",
            "floor-grpc",
            (Service("authz_port", _floor("grpc", "--batch-helper-threads")),),
        ),
        Scenario("floor-http", "extauthz-http", "floor-http", (Service("authz_port", _floor("http")),)),
        # A do-nothing server that answers exactly as extauthz does: Envoy then applies the same identity headers
        # and metadata, so extauthz-http against it is the service's own cost.
        Scenario("floor-http-answer", "extauthz-http", "floor-http", (Service("authz_port", _floor_http_answer),)),
        Scenario("extauthz-grpc", "extauthz-grpc", "floor-grpc", (Service("authz_port", _meshgate_extauthz("grpc")),)),
        Scenario("extauthz-http", "extauthz-http", "floor-http", (Service("authz_port", _meshgate_extauthz("http")),)),
        _ratelimit("floor-rls", "floor-rls", _floor("rls")),
        _ratelimit("ratelimit-memory", "floor-rls", _meshgate_ratelimit("memory")),
        # issue 3's targets compare the Redis backend with the in-memory one (saturation >= 0.9x, p99 <= 1.2x).
        _ratelimit("ratelimit-redis", "ratelimit-memory", _meshgate_ratelimit("redis"), redis=True),
        # The same server over its unix socket: a node-local Redis (unix:// backend URL).
        _ratelimit("ratelimit-redis-unix", "ratelimit-memory", _meshgate_ratelimit("redis-unix"), redis=True),
        Scenario(
            "both",
            "extauthz-ratelimit",
            BASELINE,
            (
                Service("authz_port", _meshgate_extauthz("grpc")),
                Service("ratelimit_port", _meshgate_ratelimit("memory")),
            ),
            values={"domain": RATELIMIT_DOMAIN},
            expect_stats=_AUTHZ_OK + _RL_OK,
        ),
    )
}

DEFAULT: tuple[str, ...] = tuple(SCENARIOS)
