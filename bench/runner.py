"""Boot every scenario's stack once, then drive them alternately for several rounds and report medians.

Layout (2+ cores): Envoy on core 0; the upstream, the services (and Redis) and the load generator on core 1.
Loopback hops between cores cost ~0.1 ms here, so the layout is stated with every result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from bench import loadgen
from bench.issuer import BenchIssuer
from bench.loadgen import LoadResult
from bench.scenarios import (
    BASELINE,
    RATELIMIT_CONFIG,
    RATELIMIT_PATH,
    REQUEST_PATH,
    SCENARIOS,
    RunContext,
    Scenario,
)
from meshgate.envoy import EnvoyProcess, envoy_version, render
from tests.support.ports import free_port
from tests.support.procs import Proc, start

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Options:
    scenarios: Sequence[str]
    rounds: int = 3
    duration: float = 10.0
    rates: Sequence[int] = (500, 2000)
    saturation: bool = True
    saturation_connections: int = 16
    warmup: float = 1.0
    out_dir: Path = RESULTS_DIR
    # Where redis-server runs: "service" (with the services; its CPU competes with theirs, the default) or
    # "envoy" (Envoy's core: closer to production, where Redis has a machine of its own).
    redis_core: str = "service"


@dataclass
class Stack:
    scenario: Scenario
    envoy: EnvoyProcess
    services: list[Proc]
    url: str
    headers: Mapping[str, str]
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # "500" / "saturation" -> per round
    # CPU (user + system) of the scenario's own processes per completed request, per round, by load: services,
    # plus redis-server when the scenario uses it. Less noisy than latency on a shared machine.
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    # The same for Envoy: what the scenario's answers cost it (at saturation its core is the limit on HTTP).
    envoy_cpu_us: dict[str, list[float]] = field(default_factory=dict)
    cpu_pids: tuple[int, ...] = ()
    envoy_stats: dict[str, int] = field(default_factory=dict)  # the filters' counters after all runs


def _cores() -> tuple[int | None, int | None]:
    """(Envoy core, service + load generator core), or no pinning on a single core."""
    return (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)


def _connections(rate: int) -> int:
    return 4 if rate <= 1000 else 8


def _start_stack(
    scn: Scenario, ctx: RunContext, upstream_port: int, envoy_cpu: int | None, svc_cpu: int | None
) -> Stack:
    values: dict[str, object] = {**scn.values, "listen_port": 0, "upstream_port": upstream_port}
    services: list[Proc] = []
    envoy = EnvoyProcess(cpu=envoy_cpu)
    try:
        for svc in scn.services:
            port = free_port()
            cmd, name = svc.command(port, ctx), f"{scn.name}-{svc.port_key}"
            services.append(start(cmd, ready_port=port, timeout=30, cpu=svc_cpu, env=svc.env, cwd=REPO_ROOT, name=name))
            values[svc.port_key] = port
        envoy.start(render(scn.template, **values))
        stack = Stack(scn, envoy, services, f"http://127.0.0.1:{envoy.listener_port()}{scn.path}", scn.headers(ctx))
        stack.cpu_pids = tuple(p.pid for p in services) + ((ctx.redis_pid,) if scn.needs_redis else ())
        _sanity_check(stack)
    except BaseException:
        envoy.stop()
        for proc in services:
            proc.cleanup()
        raise
    return stack


def _sanity_check(stack: Stack) -> None:
    # stack.url is the http://127.0.0.1 URL built above, never user input.
    request = urllib.request.Request(stack.url, headers=dict(stack.headers))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    tail = "\n".join(p.tail() for p in stack.services) or stack.envoy.stderr_tail()
    if status != 200:
        raise RuntimeError(f"{stack.scenario.name}: first request got {status}, expected 200\n{tail}")
    stats = _envoy_stats(stack.envoy)
    missing = [name for name in stack.scenario.expect_stats if stats.get(name, 0) <= 0]
    if missing:
        raise RuntimeError(f"{stack.scenario.name}: no Envoy count of {', '.join(missing)}: service not called\n{tail}")


_STATS_FILTER = r"^(cluster\.upstream\.ratelimit\.|http\.ingress\.ext_authz\.)"


def _envoy_stats(envoy: EnvoyProcess) -> dict[str, int]:
    """The ratelimit and ext_authz filters' counters (ok / error / failure_mode_allowed / over_limit ...)."""
    out: dict[str, int] = {}
    for line in envoy.admin_get(f"/stats?filter={urllib.parse.quote(_STATS_FILTER)}").splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


def process_cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds used so far by ``pids`` (all their live threads); 0 for a process that is gone.

    Read from each thread's ``schedstat`` (nanoseconds): ``stat``'s clock ticks are 10 ms, which at 500 rps over
    a few seconds is a step of several µs per request.
    """
    total_ns = 0
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                total_ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # the thread ended between listing and reading
    return total_ns / 1e9


class BenchRedis(NamedTuple):
    url: str  # over TCP loopback
    unix_url: str  # the same server over its unix socket
    pid: int


@contextlib.contextmanager
def _redis_server(cpu: int | None) -> Iterator[BenchRedis]:
    """A throw-away redis-server on a free loopback port and a unix socket, on ``cpu``, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-redis-") as tmp:
        socket = Path(tmp) / "redis.sock"
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp]
        cmd += ["--unixsocket", str(socket), "--unixsocketperm", "700"]
        proc = start(cmd, ready_port=port, timeout=15, cpu=cpu, name="redis")
        try:
            yield BenchRedis(f"redis://127.0.0.1:{port}/0", f"unix://{socket}", proc.pid)
        finally:
            proc.cleanup()


def redis_commandstats(url: str) -> dict[str, dict[str, float]]:
    """Redis's per-command counters (calls, usec_per_call ...): EVALSHA calls / Envoy's RLS calls shows how far
    the backend coalesces concurrent requests into one script call; EXEC calls count the MULTI/EXEC fast path."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        stats: dict[str, dict[str, float]] = client.info("commandstats")
        return stats
    finally:
        client.close()


def redis_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return ""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    found = re.search(r"v=(\S+)", out.stdout)
    return found[1] if found else out.stdout.strip()


def _stop(stacks: Sequence[Stack]) -> None:
    for stack in stacks:
        with contextlib.suppress(Exception):
            stack.envoy_stats = _envoy_stats(stack.envoy)
        stack.envoy.stop()
        for proc in stack.services:
            proc.cleanup()


def _median(results: Sequence[LoadResult]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p90_ms": statistics.median(r.p90_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "rps": statistics.median(r.rps for r in results),
        "errors": statistics.median(r.errors for r in results),
        "requests": statistics.median(r.requests for r in results),
    }


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor(),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "envoy": envoy_version(),
    }


def run(opts: Options) -> dict[str, Any]:
    """Run the benchmark; return the report (also written to ``opts.out_dir``)."""
    tool = loadgen.tool()
    envoy_cpu, svc_cpu = _cores()
    names = list(opts.scenarios)
    with contextlib.ExitStack() as resources:
        ctx = RunContext()
        if any(SCENARIOS[n].needs_issuer for n in names):
            issuer = resources.enter_context(BenchIssuer())
            answer = issuer.http_allow_answer() if "floor-http-answer" in names else None
            ctx = RunContext(policy=issuer.policy, auth_headers=issuer.headers(), http_answer=answer)
        if any(SCENARIOS[n].needs_redis for n in names):
            redis = resources.enter_context(_redis_server(envoy_cpu if opts.redis_core == "envoy" else svc_cpu))
            ctx = RunContext(ctx.policy, ctx.auth_headers, redis.url, redis.pid, ctx.http_answer, redis.unix_url)
        stacks = _drive(opts, names, ctx, envoy_cpu, svc_cpu)
        redis_stats = redis_commandstats(ctx.redis_url) if ctx.redis_url else {}
    return _report(opts, names, stacks, tool, envoy_cpu, svc_cpu, redis_stats)


def _drive(
    opts: Options, names: Sequence[str], ctx: RunContext, envoy_cpu: int | None, svc_cpu: int | None
) -> list[Stack]:
    """Boot every stack, warm each up, then run the loads alternately, round after round."""
    upstream = start(
        [sys.executable, "-m", "meshgate.devservers.echo", "--port", str(port := free_port())],
        ready_port=port,
        cpu=svc_cpu,
        cwd=REPO_ROOT,
        name="upstream",
    )
    stacks: list[Stack] = []
    try:
        for name in names:
            stacks.append(_start_stack(SCENARIOS[name], ctx, port, envoy_cpu, svc_cpu))
            print(f"  started {name}", file=sys.stderr, flush=True)
        for stack in stacks:  # warm-up, not recorded
            loadgen.run_load(
                stack.url, rate=min(opts.rates), duration=opts.warmup, connections=4, headers=stack.headers,
                cpu=svc_cpu,
            )  # fmt: skip
        for rnd in range(opts.rounds):
            order = stacks[rnd % len(stacks) :] + stacks[: rnd % len(stacks)]  # rotate: no fixed position bias
            loads: list[tuple[str, int | None, int]] = [(str(r), r, _connections(r)) for r in opts.rates]
            if opts.saturation:
                loads.append(("saturation", None, opts.saturation_connections))
            for key, rate, conns in loads:
                for stack in order:
                    cpu_before, envoy_before = process_cpu_s(stack.cpu_pids), process_cpu_s([stack.envoy.pid])
                    result = loadgen.run_load(
                        stack.url, rate=rate, duration=opts.duration, connections=conns, headers=stack.headers,
                        cpu=svc_cpu,
                    )  # fmt: skip
                    per_request = 1e6 / max(result.requests, 1)
                    cpu_us = (process_cpu_s(stack.cpu_pids) - cpu_before) * per_request
                    envoy_us = (process_cpu_s([stack.envoy.pid]) - envoy_before) * per_request
                    stack.runs.setdefault(key, []).append(result)
                    stack.cpu_us.setdefault(key, []).append(cpu_us)
                    stack.envoy_cpu_us.setdefault(key, []).append(envoy_us)
                    print(
                        f"  round {rnd + 1} {stack.scenario.name} {key}: {result} cpu {cpu_us:.0f} us/req, "
                        f"envoy {envoy_us:.0f}",
                        file=sys.stderr, flush=True,
                    )  # fmt: skip
    finally:
        _stop(stacks)
        upstream.cleanup()
    return stacks


def describe_layout(envoy_cpu: int | None, svc_cpu: int | None, redis_core: str) -> str:
    """Which process runs on which core, as the report states it."""
    if envoy_cpu is None:
        return "unpinned (single core)"
    if redis_core == "envoy":
        return f"envoy, redis-server: core {envoy_cpu}; upstream, services, load generator: core {svc_cpu} (taskset)"
    return f"envoy: core {envoy_cpu}; upstream, services, redis-server, load generator: core {svc_cpu} (taskset)"


def _report(
    opts: Options,
    names: Sequence[str],
    stacks: Sequence[Stack],
    tool: str,
    envoy_cpu: int | None,
    svc_cpu: int | None,
    redis_stats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    scenarios = {
        s.scenario.name: {
            k: {
                **_median(v),
                "cpu_us": statistics.median(s.cpu_us[k]),
                "envoy_cpu_us": statistics.median(s.envoy_cpu_us[k]),
            }
            for k, v in s.runs.items()
        }
        for s in stacks
    }
    rounds = {
        s.scenario.name: {
            k: [
                {**asdict(r), "cpu_us": c, "envoy_cpu_us": e}
                for r, c, e in zip(v, s.cpu_us[k], s.envoy_cpu_us[k], strict=True)
            ]
            for k, v in s.runs.items()
        }
        for s in stacks
    }
    layout = describe_layout(envoy_cpu, svc_cpu, opts.redis_core)
    report: dict[str, Any] = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "layout": layout,
        "load_generator": loadgen.tool_version(tool),
        "settings": {
            **{k: v for k, v in asdict(opts).items() if k != "out_dir"},
            "connections": {str(r): _connections(r) for r in opts.rates},
        },
        "workload": {
            "request": f"GET {REQUEST_PATH}",
            "extauthz": "JWT RS256 (2048-bit key from a local JWKS server) + bench/policy-20-rules.yaml (admitted by "
            "rule 15); one token minted per run and reused by every request, as real clients reuse tokens, so the "
            "verified-token cache serves all but the first request",
            "ratelimit": f"GET {RATELIMIT_PATH} with x-user through envoy/ratelimit.yaml: 3 descriptors per request "
            f"(generic_key, user, path) against {RATELIMIT_CONFIG.relative_to(REPO_ROOT)} (limits never reached); "
            "'both': extauthz (gRPC) + ratelimit (memory) through envoy/extauthz-ratelimit.yaml, 1 descriptor "
            "(tier, sub) from ext_authz metadata",
            "redis": f"redis-server {redis_version()} --save '' --appendonly no, on the service core"
            if any(SCENARIOS[n].needs_redis for n in names)
            else "",
        },
        "scenarios": scenarios,
        "references": {n: SCENARIOS[n].reference for n in names},
        "comparisons": compare(scenarios, {n: SCENARIOS[n].reference for n in names}),
        "rounds": rounds,
        "paired": paired(rounds, {n: SCENARIOS[n].reference for n in names}),
        "envoy_stats": {s.scenario.name: s.envoy_stats for s in stacks},
        "redis_commandstats": dict(redis_stats or {}),  # whole run, warm-up included
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    path = opts.out_dir / f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report


Figures = Mapping[str, float]  # one load's figures: p50_ms, p99_ms, rps, cpu_us ... (a median or one round's)


def _ratios(key: str, mine: Figures, theirs: Figures | None, base: Figures | None) -> dict[str, float | None]:
    """One load's comparison with the reference (``theirs``) and BASELINE (``base``), either when missing."""
    row: dict[str, float | None] = {}
    if theirs is not None and mine.get("cpu_us") and theirs.get("cpu_us"):
        row[f"{key}_cpu_x_ref"] = mine["cpu_us"] / theirs["cpu_us"]
    if key == "saturation":
        if theirs is not None and theirs["rps"]:
            row["saturation_x_ref"] = mine["rps"] / theirs["rps"]
        return row
    for q in ("p50", "p99"):
        if theirs is not None and theirs[f"{q}_ms"] > 0:
            row[f"{key}_raw_x_ref_{q}"] = mine[f"{q}_ms"] / theirs[f"{q}_ms"]
        if base is None:
            continue
        added = mine[f"{q}_ms"] - base[f"{q}_ms"]
        row[f"{key}_added_{q}_ms"] = added
        if theirs is not None:
            ref_added = theirs[f"{q}_ms"] - base[f"{q}_ms"]
            row[f"{key}_x_ref_{q}"] = added / ref_added if ref_added > 0 else None
    return row


def compare(
    scenarios: Mapping[str, Mapping[str, Figures]], references: Mapping[str, str | None]
) -> dict[str, dict[str, float | None]]:
    """Per scenario, against its reference scenario (``references``: name -> reference name or None):

    ``<load>_added_<q>_ms``: latency added over BASELINE at the same load; ``<load>_x_ref_<q>``: that added latency
    / the reference's (None when the reference adds nothing, e.g. BASELINE itself); ``<load>_raw_x_ref_<q>``: the
    plain latency ratio (issue 3's Redis-vs-memory p99 target); ``saturation_x_ref``: saturation rps ratio;
    ``<load>_cpu_x_ref``: CPU per request of the scenario's processes / the reference's (all processes on the
    service core but the load generator and the upstream).
    """
    out: dict[str, dict[str, float | None]] = {}
    base = scenarios.get(BASELINE, {})
    for name, runs in scenarios.items():
        ref_name = references.get(name)
        ref = scenarios.get(ref_name, {}) if ref_name else {}
        row: dict[str, float | None] = {}
        for key, med in runs.items():
            row.update(_ratios(key, med, ref.get(key), base.get(key)))
        out[name] = row
    return out


def paired(
    rounds: Mapping[str, Mapping[str, Sequence[Figures]]], references: Mapping[str, str | None]
) -> dict[str, dict[str, dict[str, float]]]:
    """The ratios of ``compare``, computed round by round against the reference's (and BASELINE's) same round.

    The scenarios alternate within a round, so a round's pair ran minutes apart at most and saw the same machine:
    slow drifts cancel out. Per scenario and ratio (every ``*_x_ref*`` key of ``compare``): the median, min and max
    over the rounds, which shows how far one run can be trusted.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    base = rounds.get(BASELINE, {})
    for name, runs in rounds.items():
        ref_name = references.get(name)
        ref = rounds.get(ref_name) if ref_name and ref_name != name else None
        if ref is None:
            continue
        per_round: dict[str, list[float]] = {}
        for key, results in runs.items():
            base_runs = base.get(key, ())
            for i, (mine, theirs) in enumerate(zip(results, ref.get(key, ()), strict=False)):
                ratios = _ratios(key, mine, theirs, base_runs[i] if i < len(base_runs) else None)
                for metric, value in ratios.items():
                    if "_x_ref" in metric and value is not None:
                        per_round.setdefault(metric, []).append(value)
        out[name] = {
            metric: {"median": statistics.median(values), "min": min(values), "max": max(values)}
            for metric, values in per_round.items()
        }
    return out


def _paired_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, metrics in report.get("paired", {}).items():
        ref = report.get("references", {}).get(name)
        parts = [
            f"{metric.replace('_x_ref', '')} {m['median']:.2f} [{m['min']:.2f}-{m['max']:.2f}]"
            for metric, m in metrics.items()
        ]
        if parts:
            lines.append(f"{name} vs {ref}: " + ", ".join(parts))
    if not lines:
        return []
    return ["", "paired per round (median [min-max] of each round's ratio to vs's same round):", *lines]


def _short_version(text: str) -> str:
    found = re.search(r"/(\d+\.\d+\.\d+)/", text)
    return found[1] if found else text


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: Mapping[str, Any]) -> str:
    """The human summary: one row per scenario and load, with its reference scenario (``vs``)."""
    lines = [
        f"machine: {report['machine']['cpu_model']}, {report['machine']['nproc']} cores, "
        f"python {report['machine']['python']}, envoy {_short_version(report['machine']['envoy'])}",
        f"layout: {report['layout']}; load generator: {report['load_generator']}",
        f"medians of {report['settings']['rounds']} rounds x {report['settings']['duration']:g} s",
        "",
        f"{'scenario':<16} {'load':>9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'rps':>6} {'err':>4} "
        f"{'+p50':>6} {'+p99':>6} {'vs':<16} {'x+p50':>6} {'x+p99':>6} {'x p99':>6} {'sat x':>6} {'cpu us':>6} "
        f"{'cpu x':>6} {'envoy us':>8}",
    ]
    references = report.get("references", {})
    for name, runs in report["scenarios"].items():
        cmp_row = report["comparisons"].get(name, {})
        ref = references.get(name) or "-"
        for key, med in runs.items():
            sat = key == "saturation"
            lines.append(
                f"{name:<16} {('max' if sat else key + ' rps'):>9} {med['p50_ms']:>7.3f} {med['p90_ms']:>7.3f} "
                f"{med['p99_ms']:>7.3f} {med['rps']:>6.0f} {med['errors']:>4.0f} "
                f"{_fmt(cmp_row.get(f'{key}_added_p50_ms'), '6.3f'):>6} "
                f"{_fmt(cmp_row.get(f'{key}_added_p99_ms'), '6.3f'):>6} {ref:<16} "
                f"{_fmt(cmp_row.get(f'{key}_x_ref_p50'), '6.2f'):>6} "
                f"{_fmt(cmp_row.get(f'{key}_x_ref_p99'), '6.2f'):>6} "
                f"{_fmt(cmp_row.get(f'{key}_raw_x_ref_p99'), '6.2f'):>6} "
                f"{_fmt(cmp_row.get('saturation_x_ref') if sat else None, '6.2f'):>6} "
                f"{_fmt(med.get('cpu_us'), '6.0f'):>6} {_fmt(cmp_row.get(f'{key}_cpu_x_ref'), '6.2f'):>6} "
                f"{_fmt(med.get('envoy_cpu_us'), '8.0f'):>8}"
            )
    lines += [
        "",
        "+p50/+p99 (ms): added over passthrough at the same load; vs: the scenario compared with;",
        "x+p50/x+p99: added latency / vs's added latency; x p99: p99 / vs's p99; sat x: saturation rps / vs's;",
        "cpu us: CPU per request of the scenario's services (+ redis-server); cpu x: that / vs's;",
        "envoy us: Envoy's CPU per request (its core is the limit at saturation behind the HTTP services)",
        "(saturation shares core 1 with the load generator).",
        *_paired_lines(report),
    ]
    return "\n".join(lines)
