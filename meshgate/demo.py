"""``meshgate demo``: a real Envoy in front of an echo upstream, guarded by extauthz, all on loopback.

It generates a signing key, serves it from a local JWKS endpoint, writes a small policy and an API-keys file, starts
extauthz (as a child process, exactly as ``meshgate serve`` runs it) and Envoy, then takes a short tour and prints
curl lines to try by hand. Nothing here needs Redis or the network beyond 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.identity.apikey import generate_api_key, hash_api_key
from meshgate.devservers.echo import EchoThread
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.service import ServiceProcess
from meshgate.devservers.signing import SigningKey, generate_rsa_key, mint_token
from meshgate.envoy import EnvoyProcess, render

POLICY = """\
version: 1
identity:
  order: [jwt, api_key]
  jwt:
    issuers:
      - issuer: {issuer}
        audiences: [demo-api]
        jwks_uri: {jwks_uri}
        algorithms: [RS256]
    claims:
      roles: [realm_access.roles]
      tier: plan
  api_key:
    keys_file: keys.yaml
rules:
  - name: health-is-public
    public: true
    match: {{paths: [/healthz]}}
  - name: admins-only
    effect: deny
    match: {{path_prefixes: [/admin/]}}
    identity: {{kinds: [jwt]}}
  - name: readers
    match: {{path_prefixes: [/api/], methods: [GET]}}
    identity: {{roles_any: [reader]}}
  - name: reporting-service
    match: {{path_prefixes: [/api/reports/]}}
    identity: {{clients: [reporting]}}
"""

KEYS = """\
clients:
  - client: reporting
    tier: premium
    keys:
      - id: demo-1
        sha256: {digest}
"""


@dataclass(frozen=True, slots=True)
class Step:
    title: str
    path: str
    headers: dict[str, str]
    expect_status: int
    expect_upstream: dict[str, str]


@dataclass(frozen=True, slots=True)
class Demo:
    port: int
    reader_token: str
    stranger_token: str
    api_key: str


def _claims(issuer: str, subject: str, roles: list[str]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": issuer,
        "aud": "demo-api",
        "sub": subject,
        "iat": now,
        "exp": now + 3600,
        "plan": "free",
        "realm_access": {"roles": roles},
    }


@contextmanager
def running_demo(say: Callable[[str], None]) -> Iterator[Demo]:
    """Start everything; yield the Envoy port and credentials; stop everything on exit."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshgate-demo-")))
        key: SigningKey = generate_rsa_key("demo-key-1")
        jwks = stack.enter_context(JwksServer([key]))
        upstream = stack.enter_context(EchoThread())
        api_key = generate_api_key()
        (workdir / "keys.yaml").write_text(KEYS.format(digest=hash_api_key(api_key)))
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY.format(issuer=jwks.issuer, jwks_uri=jwks.jwks_uri))
        say(f"policy: {policy}")
        service = stack.enter_context(ServiceProcess(["extauthz", "--config", str(policy), "--drain-seconds", "1"]))
        ports = service.ports
        say(f"extauthz: gRPC :{ports['grpc_port']}  HTTP :{ports['http_port']}  admin :{ports['admin_port']}")
        config = render("extauthz-grpc.yaml", listen_port=0, upstream_port=upstream.port, authz_port=ports["grpc_port"])
        envoy = stack.enter_context(EnvoyProcess().start(config))
        port = envoy.listener_port()
        say(f"envoy: listening on 127.0.0.1:{port} (admin :{envoy.admin_port})")
        yield Demo(
            port=port,
            reader_token=mint_token(key, key.kid, _claims(jwks.issuer, "alice", ["reader"])),
            stranger_token=mint_token(key, key.kid, _claims(jwks.issuer, "bob", [])),
            api_key=api_key,
        )


def tour_steps(demo: Demo) -> list[Step]:
    bearer = {"authorization": f"Bearer {demo.reader_token}", "x-auth-subject": "forged-admin"}
    return [
        Step("no credential -> 401", "/api/hello", {}, 401, {}),
        Step("public path, no credential -> 200", "/healthz", {}, 200, {}),
        Step("reader token -> 200, identity forwarded", "/api/hello", bearer, 200, {"x-auth-subject": "alice"}),
        Step(
            "token without the reader role -> 403",
            "/api/hello",
            {"authorization": f"Bearer {demo.stranger_token}"},
            403,
            {},
        ),
        Step(
            "API key of the reporting service -> 200",
            "/api/reports/daily",
            {"x-api-key": demo.api_key},
            200,
            {"x-auth-client": "reporting", "x-auth-tier": "premium"},
        ),
        Step("bad token -> 401", "/api/hello", {"authorization": "Bearer not-a-jwt"}, 401, {}),
    ]


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    return reply.status, parsed if isinstance(parsed, dict) else {}


def run_tour(demo: Demo, say: Callable[[str], None]) -> bool:
    ok = True
    for step in tour_steps(demo):
        status, body = _get(demo.port, step.path, step.headers)
        seen = {name.lower(): value for name, value in body.get("headers", {}).items()}
        passed = status == step.expect_status and all(seen.get(k) == v for k, v in step.expect_upstream.items())
        ok = ok and passed
        detail = f"got {status}"
        if status >= 400:
            detail += f" {body.get('error', {}).get('code', '')}".rstrip()
        say(f"{'PASS' if passed else 'FAIL'}  {step.title:45} {detail}")
    return ok


def curl_lines(demo: Demo) -> str:
    base = f"http://127.0.0.1:{demo.port}"
    return textwrap.dedent(
        f"""\
        Try it (Ctrl-C stops everything):
          curl -i {base}/api/hello
          curl -i {base}/api/hello -H 'Authorization: Bearer {demo.reader_token}'
          curl -i {base}/api/hello -H 'Authorization: Bearer {demo.stranger_token}'
          curl -i {base}/api/reports/daily -H 'x-api-key: {demo.api_key}'"""
    )


def run_demo(*, tour_only: bool = False, say: Callable[[str], None] = print) -> int:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    stop = threading.Event()
    try:
        with running_demo(say) as demo:
            ok = run_tour(demo, say)
            if tour_only:
                return 0 if ok else 1
            say(curl_lines(demo))
            stop.wait()
    except KeyboardInterrupt:
        say("\nstopping")
    return 0
