"""Where extauthz spends its time, two ways (both bounded):

``python -m bench.profile micro [--calls N]``
    In one process, no Envoy: µs per call of each step of the bench request (RS256 token from the bench issuer,
    the 20-rule bench policy) - gRPC parse + ``to_check_input``, ``Pipeline.decide`` (token cached), each
    transport's encoding of the answer, one whole HTTP request through the connection; then the ratelimit bench
    request (3 descriptors) on the memory backend. Our code's share, without any transport.

``python -m bench.profile spy {grpc,http,floor-grpc,...} [--rate N] [--duration S] [--native] [--save F]``
    The bench stack (Envoy on core 0, ``meshgate serve extauthz`` + load generator on core 1) under fixed-rate
    load while py-spy samples the service; prints the functions with the most CPU (self, and inclusive for our
    modules) as % of the service's busy samples. Needs ``pip install py-spy``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import loadgen
from bench import runner as runner_mod
from bench.issuer import BenchIssuer
from bench.scenarios import REQUEST_PATH, SCENARIOS, RunContext

OUR_CODE = ("extauthz/", "meshgate/")
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


# ---- micro --------------------------------------------------------------------------------------------------


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    for _ in range(min(calls, 1000)):  # warm caches
        fn()
    best = float("inf")
    for _ in range(5):  # best of 5 batches: the least disturbed figure
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def _check_request(token: str) -> bytes:
    """A CheckRequest shaped like Envoy's for the bench request (headers as Envoy sends them)."""
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.id = "12345678901234567890"
    http.method = "GET"
    http.path = REQUEST_PATH
    http.host = "127.0.0.1:10000"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.headers.update(
        {
            ":authority": "127.0.0.1:10000",
            ":method": "GET",
            ":path": REQUEST_PATH,
            ":scheme": "http",
            "authorization": f"Bearer {token}",
            "user-agent": "h2load nghttp2/1.52.0",
            "x-forwarded-proto": "http",
            "x-request-id": "5f0c6a4e-3b9a-4e5e-9a51-2f3c1d7b8e90",
        }
    )
    request.attributes.source.address.socket_address.address = "127.0.0.1"
    request.attributes.destination.address.socket_address.address = "127.0.0.1"
    return bytes(request.SerializeToString())


async def _micro(calls: int) -> list[tuple[str, float]]:
    from envoy.service.auth.v3 import external_auth_pb2

    from extauthz.app import build_pipeline
    from extauthz.grpc_adapter import to_check_input, to_check_response
    from extauthz.http_adapter import encode_decision
    from extauthz.identity.jwks import JwksRegistry
    from extauthz.model import CheckInput, Reason
    from extauthz.response import allow

    with BenchIssuer() as issuer:
        registry = JwksRegistry()
        pipeline = build_pipeline(issuer.policy, registry)
        await pipeline.start()
        try:
            wire = _check_request(issuer.token)
            parsed = external_auth_pb2.CheckRequest.FromString(wire)
            grpc_input = to_check_input(parsed)
            http_input = CheckInput(
                method="GET",
                host="127.0.0.1:10000",
                path=REQUEST_PATH,
                headers={"host": "127.0.0.1:10000", "authorization": issuer.headers()["authorization"]},
                request_id="",
            )
            decision = pipeline.decide(http_input)
            if not decision.allowed:
                raise RuntimeError(f"bench request denied: {decision.reason} {decision.message}")
            provider = pipeline.providers[0]
            who = provider.authenticate(http_input)
            settings = pipeline.response_settings
            steps: list[tuple[str, Callable[[], object]]] = [
                ("grpc: CheckRequest.FromString (upb)", lambda: external_auth_pb2.CheckRequest.FromString(wire)),
                ("grpc: to_check_input", lambda: to_check_input(parsed)),
                ("grpc: Pipeline.decide (cached token)", lambda: pipeline.decide(grpc_input)),
                ("grpc: to_check_response + serialize", lambda: to_check_response(decision).SerializeToString()),
                ("http: Pipeline.decide (cached token)", lambda: pipeline.decide(http_input)),
                ("  decide: identity provider (token cache hit)", lambda: provider.authenticate(http_input)),
                ("  decide: Policy.evaluate (rule 15 of 20)", lambda: pipeline.policy.evaluate(http_input, who, None)),
                ("  decide: response.allow", lambda: allow(who, "items-read", Reason.ALLOWED, settings)),
                ("  decide: observer.record", lambda: pipeline.observer.record(http_input, decision, 1e-5)),
                ("http: encode_decision", lambda: encode_decision(decision)),
                ("http: one request through the connection, parsed", _http_request(pipeline, issuer.headers(), False)),
                ("http: one request through the connection, remembered", _http_request(pipeline, issuer.headers())),
            ]
            return [(name, _per_call_us(fn, calls)) for name, fn in steps] + _ratelimit_steps(calls)
        finally:
            await pipeline.close()
            await registry.close()


class _NullTransport:
    """Stands in for the socket: the connection writes its answers here."""

    def write(self, data: bytes) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _http_request(pipeline: object, auth: Mapping[str, str], remembered: bool = True) -> Callable[[], object]:
    """One HTTP ext_authz request as Envoy sends it, through the connection: parse, input, decide, encode, write.

    ``remembered``: answered as an identical earlier request (Envoy's spelling of the request id); else the id is
    spelt so that the request is never remembered, and every call is parsed.
    """
    from extauthz import http_adapter

    head = f"GET {REQUEST_PATH} HTTP/1.1\r\nhost: 127.0.0.1:10000\r\ncontent-length: 0\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in auth.items())
    request_id = "x-request-id" if remembered else "X-Request-Id"
    head += f"{request_id}: 5f0c6a4e-3b9a-4e5e-9a51-2f3c1d7b8e90\r\nx-forwarded-proto: http\r\n"
    head += "x-envoy-expected-rq-timeout-ms: 1000\r\n\r\n"
    wire = head.encode()
    ctx = http_adapter._Context(lambda: pipeline, "", "/forward-auth", 65536, 1 << 20)  # type: ignore[arg-type,return-value]
    connection = http_adapter._Connection(ctx)
    connection.connection_made(_NullTransport())  # type: ignore[arg-type]
    return lambda: connection.data_received(wire)


def _ratelimit_steps(calls: int) -> list[tuple[str, float]]:
    """The bench's ratelimit request (3 descriptors, bench/ratelimit) on the memory backend, step by step."""
    from envoy.service.ratelimit.v3 import rls_pb2

    from bench.scenarios import RATELIMIT_CONFIG, RATELIMIT_DOMAIN
    from ratelimit.backends.memory import MemoryBackend
    from ratelimit.config import load_config
    from ratelimit.server import RateLimitServicer, RequestParser, to_response
    from ratelimit.service import RateLimitService

    config = load_config(RATELIMIT_CONFIG)
    service = RateLimitService(lambda: config, MemoryBackend())
    request = rls_pb2.RateLimitRequest(domain=RATELIMIT_DOMAIN)
    for key, value in (("generic_key", "api"), ("user", "bench-user"), ("path", "reports")):
        request.descriptors.add().entries.add(key=key, value=value)
    wire = request.SerializeToString()
    parser = RequestParser()
    model = parser(wire)
    servicer = RateLimitServicer(lambda: service)

    def finish(coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine that never suspends (the memory backend answers at once)."""
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        coroutine.close()
        raise RuntimeError("the memory backend suspended")

    answer = finish(service.should_rate_limit(model))  # type: ignore[arg-type]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("ratelimit: RequestParser (repeated request)", lambda: parser(wire)),
        ("ratelimit: should_rate_limit (memory)", lambda: finish(service.should_rate_limit(model))),  # type: ignore[arg-type]
        ("ratelimit: to_response", lambda: to_response(answer)),
        ("ratelimit: ShouldRateLimit whole", lambda: finish(servicer.ShouldRateLimit(model, None))),
    ]
    return [(name, _per_call_us(fn, calls)) for name, fn in steps]


# ---- spy ----------------------------------------------------------------------------------------------------


def summarize(raw: str, top: int = 25) -> str:
    """py-spy's raw (collapsed) stacks -> top self-time functions, and inclusive time of our functions."""
    total = 0
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        # Skip the process/thread label frames py-spy may add; keep real frames only.
        frames = [f for f in frames if f]
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            if any(part in frame for part in OUR_CODE):
                inclusive[frame] += count
    if not total:
        return "no samples (is the service busy? does py-spy have ptrace rights?)"
    lines = [f"{total} busy samples", "", "self time (top):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "inclusive time, our modules (top):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    return f"{found['func']} ({found['file']})"


def _scenario(target: str) -> str:
    """``grpc``/``http`` mean extauthz on that transport; any scenario with a service may be named too."""
    return f"extauthz-{target}" if target in ("grpc", "http") else target


def _coalescing_counts(stack: runner_mod.Stack, redis_url: str) -> tuple[int, int, float]:
    """(Envoy's RLS calls answered, Redis calls (EVALSHA/EVAL scripts, MULTI/EXEC), Redis µs in them) so far."""
    from bench import runner

    if not redis_url:
        return (0, 0, 0.0)
    rls = runner._envoy_stats(stack.envoy).get("cluster.upstream.ratelimit.ok", 0)
    stats = runner.redis_commandstats(redis_url)
    scripts = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval", "exec")]
    return rls, sum(int(s.get("calls", 0)) for s in scripts), sum(float(s.get("usec", 0)) for s in scripts)


def _coalescing(before: tuple[int, int, float], after: tuple[int, int, float]) -> str:
    rls, calls, usec = (a - b for a, b in zip(after, before, strict=True))
    per = f"{rls / calls:.2f}" if calls else "-"
    cost = f"{usec / calls:.1f}" if calls else "-"
    return f"coalescing: {rls:.0f} RLS calls -> {calls:.0f} Redis calls ({per} requests/call; {cost} µs each)"


def _spy(transport: str, rate: int, duration: float, native: bool, save: Path | None, service: int = -1) -> str:
    from bench import runner
    from tests.support.ports import free_port
    from tests.support.procs import start

    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    envoy_cpu, svc_cpu = runner._cores()
    scenario = SCENARIOS[_scenario(transport)]
    with contextlib.ExitStack() as resources:
        issuer = resources.enter_context(BenchIssuer())
        tmp = resources.enter_context(tempfile.TemporaryDirectory(prefix="meshgate-profile-"))
        redis = resources.enter_context(runner._redis_server(svc_cpu)) if scenario.needs_redis else None
        redis_url = redis.url if redis is not None else ""
        ctx = RunContext(
            policy=issuer.policy,
            auth_headers=issuer.headers(),
            redis_url=redis_url,
            redis_pid=redis.pid if redis is not None else 0,
            redis_unix_url=redis.unix_url if redis is not None else "",
        )
        upstream = start(
            [sys.executable, "-m", "meshgate.devservers.echo", "--port", str(port := free_port())],
            ready_port=port,
            cpu=svc_cpu,
            cwd=runner.REPO_ROOT,
            name="upstream",
        )
        stack = None
        try:
            stack = runner._start_stack(scenario, ctx, port, envoy_cpu, svc_cpu)
            target = stack.services[service]  # default: the last service (the one a scenario adds)
            load_rate = rate or None  # 0 = saturation
            conns = runner._connections(rate) if rate else 16
            warm = rate or 500
            loadgen.run_load(stack.url, rate=warm, duration=2.0, connections=4, headers=stack.headers, cpu=svc_cpu)
            out = Path(tmp) / "profile.txt"
            cmd = [py_spy, "record", "-p", str(target.pid), "-d", f"{max(1, round(duration))}", "-r", "250"]
            cmd += ["-f", "raw", "-o", str(out), "--nonblocking", "--threads", *(["--native"] if native else [])]
            if envoy_cpu is not None and shutil.which("taskset"):
                cmd = ["taskset", "-c", str(envoy_cpu), *cmd]  # off the service's core
            before = _coalescing_counts(stack, redis_url)
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            try:
                result = loadgen.run_load(
                    stack.url, rate=load_rate, duration=duration, connections=conns, headers=stack.headers,
                    cpu=svc_cpu,
                )  # fmt: skip
                _, err = spy.communicate(timeout=duration + 30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait(timeout=10)
            if not out.exists():
                raise SystemExit(f"py-spy wrote nothing: {err[-800:]}")
            if save is not None:
                save.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out, save)
            header = f"{scenario.name} at {rate or 'max'} rps for {duration:g} s under py-spy: {result}"
            if redis_url:
                header += "\n" + _coalescing(before, _coalescing_counts(stack, redis_url))
            return header + "\n" + summarize(out.read_text())
        finally:
            if stack is not None:
                runner._stop([stack])
            upstream.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    micro = sub.add_parser("micro", help="µs per step, in process")
    micro.add_argument("--calls", type=int, default=20_000)
    spy = sub.add_parser("spy", help="py-spy the service behind Envoy under load")
    targets = ["grpc", "http", *(name for name, s in SCENARIOS.items() if s.services)]
    spy.add_argument("transport", choices=targets, help="grpc/http: extauthz on that transport; or a scenario")
    spy.add_argument("--rate", type=int, default=2000, help="rps; 0 = saturation (16 connections)")
    spy.add_argument("--service", type=int, default=-1, help="which of the scenario's services (default: last)")
    spy.add_argument("--duration", type=float, default=15.0)
    spy.add_argument("--native", action="store_true", help="include native (C/Cython) frames")
    spy.add_argument("--save", type=Path, help="also keep py-spy's raw collapsed stacks here")
    args = parser.parse_args(argv)
    if args.command == "micro":
        for name, us in asyncio.run(_micro(max(1, args.calls))):
            print(f"{us:8.2f} µs  {name}")
    else:
        if args.duration <= 0 or args.duration > 120:
            parser.error("--duration must be in (0, 120]")
        print(_spy(args.transport, args.rate, args.duration, args.native, args.save, args.service))


if __name__ == "__main__":
    main()
