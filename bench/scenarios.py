"""The scenario table. Adding a scenario = one entry in SCENARIOS (and its name in DEFAULT if it should run by
default): the Envoy template, the transport whose floor it is compared with, the service command (given the port
the harness picked and the run's context), and the request headers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
POLICY = BENCH_DIR / "policy-20-rules.yaml"
POLICY_ISSUER = "http://127.0.0.1/bench"  # placeholder in POLICY, replaced by bench/issuer.py at run time
REQUEST_PATH = "/api/v1/items/42"  # admitted by POLICY's rule 15 (items-read); every scenario sends it


@dataclass(frozen=True)
class RunContext:
    """What one bench invocation sets up once for all scenarios: the rendered policy and the request headers."""

    policy: Path = POLICY
    auth_headers: Mapping[str, str] = field(default_factory=dict)  # the token, minted once per run


Command = Callable[[int, RunContext], list[str]]  # (port, context) -> argv


def _auth_headers(ctx: RunContext) -> Mapping[str, str]:
    return ctx.auth_headers


@dataclass(frozen=True)
class Scenario:
    name: str
    template: str  # envoy/<template>.yaml; rendered with listen_port, upstream_port and (if a service) authz_port
    transport: str  # "none" (baseline) | "grpc" | "http": picks the floor for ratios
    service: Command | None = None  # the authz service, run on the service core; None = no service
    # Every scenario sends the same request (with the bearer token), so the only difference is the service.
    headers: Callable[[RunContext], Mapping[str, str]] = _auth_headers
    path: str = REQUEST_PATH
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for the service
    needs_issuer: bool = True  # the run starts the bench JWKS issuer (mints the token) and renders the policy


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _floor(transport: str) -> Command:
    return lambda port, ctx: _py("bench.floors", transport, "--port", str(port))


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


FLOOR = {"grpc": "floor-grpc", "http": "floor-http"}
BASELINE = "passthrough"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("passthrough", "passthrough", "none"),
        Scenario("floor-grpc", "extauthz-grpc", "grpc", _floor("grpc")),
        Scenario("floor-http", "extauthz-http", "http", _floor("http")),
        Scenario("extauthz-grpc", "extauthz-grpc", "grpc", _meshgate_extauthz("grpc")),
        Scenario("extauthz-http", "extauthz-http", "http", _meshgate_extauthz("http")),
    )
}

DEFAULT: tuple[str, ...] = tuple(SCENARIOS)
