"""The scenario table. Adding a scenario = one entry in SCENARIOS (and its name in DEFAULT if it should run by
default): the Envoy template, the transport whose floor it is compared with, the service command (given the port
the harness picked), and the request headers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt

BENCH_DIR = Path(__file__).resolve().parent
POLICY = BENCH_DIR / "policy-20-rules.yaml"
# A public, bench-only HS256 secret (>= 32 bytes); it protects nothing.
JWT_SECRET = "meshgate-bench-secret-not-for-production-0123456789"  # noqa: S105
JWT_ENV = {"MESHGATE_BENCH_JWT_SECRET": JWT_SECRET}

Command = Callable[[int], list[str]]  # port -> argv


@dataclass(frozen=True)
class Scenario:
    name: str
    template: str  # envoy/<template>.yaml; rendered with listen_port, upstream_port and (if a service) authz_port
    transport: str  # "none" (baseline) | "grpc" | "http": picks the floor for ratios
    service: Command | None = None  # the authz service, run on the service core; None = no service
    headers: Callable[[], Mapping[str, str]] = dict  # request headers (called once per invocation)
    path: str = "/api/orders"
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for the service


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def bench_token() -> dict[str, str]:
    """A reader's HS256 JWT for policy-20-rules.yaml, valid for an hour."""
    now = int(time.time())
    claims = {
        "iss": "https://bench.meshgate.local",
        "aud": "bench",
        "sub": "bench-user",
        "roles": ["reader"],
        "iat": now,
        "exp": now + 3600,
    }
    return {"authorization": f"Bearer {jwt.encode(claims, JWT_SECRET, algorithm='HS256')}"}


def _meshgate_extauthz(transport: str) -> Command:
    """``meshgate serve extauthz`` serving the bench policy on ``port`` for one transport."""

    def command(port: int) -> list[str]:
        grpc_port = str(port) if transport == "grpc" else "0"  # gRPC cannot be turned off: 0 = a free, idle port
        http_port = str(port) if transport == "http" else "-1"
        return _py(
            "meshgate", "serve", "extauthz", "--config", str(POLICY), "--grpc-port", grpc_port,
            "--http-port", http_port, "--admin-port", "-1", "--log-level", "warning",
        )  # fmt: skip

    return command


FLOOR = {"grpc": "floor-grpc", "http": "floor-http"}
BASELINE = "passthrough"

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("passthrough", "passthrough", "none"),
        Scenario("floor-grpc", "extauthz-grpc", "grpc", lambda port: _py("bench.floors", "grpc", "--port", str(port))),
        Scenario("floor-http", "extauthz-http", "http", lambda port: _py("bench.floors", "http", "--port", str(port))),
        Scenario("extauthz-grpc", "extauthz-grpc", "grpc", _meshgate_extauthz("grpc"), bench_token, env=JWT_ENV),
        Scenario("extauthz-http", "extauthz-http", "http", _meshgate_extauthz("http"), bench_token, env=JWT_ENV),
    )
}

# Run by default; the extauthz entries join once `meshgate serve extauthz` is wired (the lead decides).
DEFAULT: tuple[str, ...] = ("passthrough", "floor-grpc", "floor-http")
