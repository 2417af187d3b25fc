"""Boot every scenario's stack once, then drive them alternately for several rounds and report medians.

Layout (2+ cores): Envoy on core 0; the upstream, the authz service and the load generator on core 1. Loopback
hops between cores cost ~0.1 ms here, so the layout is stated with every result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.issuer import BenchIssuer
from bench.loadgen import LoadResult
from bench.scenarios import BASELINE, FLOOR, REQUEST_PATH, SCENARIOS, RunContext, Scenario
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


@dataclass
class Stack:
    scenario: Scenario
    envoy: EnvoyProcess
    service: Proc | None
    url: str
    headers: Mapping[str, str]
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # "500" / "saturation" -> per round


def _cores() -> tuple[int | None, int | None]:
    """(Envoy core, service + load generator core), or no pinning on a single core."""
    return (0, 1) if (os.cpu_count() or 1) >= 2 else (None, None)


def _connections(rate: int) -> int:
    return 4 if rate <= 1000 else 8


def _start_stack(
    scn: Scenario, ctx: RunContext, upstream_port: int, envoy_cpu: int | None, svc_cpu: int | None
) -> Stack:
    values: dict[str, object] = {"listen_port": 0, "upstream_port": upstream_port}
    service = None
    if scn.service is not None:
        port = free_port()
        service = start(
            scn.service(port, ctx), ready_port=port, timeout=30, cpu=svc_cpu, env=scn.env, cwd=REPO_ROOT, name=scn.name
        )
        values["authz_port"] = port
    envoy = EnvoyProcess(cpu=envoy_cpu)
    try:
        envoy.start(render(scn.template, **values))
    except BaseException:
        if service is not None:
            service.cleanup()
        raise
    stack = Stack(scn, envoy, service, f"http://127.0.0.1:{envoy.listener_port()}{scn.path}", scn.headers(ctx))
    _sanity_check(stack)
    return stack


def _sanity_check(stack: Stack) -> None:
    # stack.url is the http://127.0.0.1 URL built above, never user input.
    request = urllib.request.Request(stack.url, headers=dict(stack.headers))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    if status != 200:
        tail = stack.service.tail() if stack.service else stack.envoy.stderr_tail()
        raise RuntimeError(f"{stack.scenario.name}: first request got {status}, expected 200\n{tail}")


def _stop(stacks: Sequence[Stack]) -> None:
    for stack in stacks:
        stack.envoy.stop()
        if stack.service is not None:
            stack.service.cleanup()


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
            ctx = RunContext(policy=issuer.policy, auth_headers=issuer.headers())
        stacks = _drive(opts, names, ctx, envoy_cpu, svc_cpu)
    return _report(opts, names, stacks, tool, envoy_cpu, svc_cpu)


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
                    result = loadgen.run_load(
                        stack.url, rate=rate, duration=opts.duration, connections=conns, headers=stack.headers,
                        cpu=svc_cpu,
                    )  # fmt: skip
                    stack.runs.setdefault(key, []).append(result)
                    print(f"  round {rnd + 1} {stack.scenario.name} {key}: {result}", file=sys.stderr, flush=True)
    finally:
        _stop(stacks)
        upstream.cleanup()
    return stacks


def _report(
    opts: Options, names: Sequence[str], stacks: Sequence[Stack], tool: str, envoy_cpu: int | None, svc_cpu: int | None
) -> dict[str, Any]:
    scenarios = {s.scenario.name: {k: _median(v) for k, v in s.runs.items()} for s in stacks}
    layout = (
        f"envoy: core {envoy_cpu}; upstream, authz service, load generator: core {svc_cpu} (taskset)"
        if envoy_cpu is not None
        else "unpinned (single core)"
    )
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
        },
        "scenarios": scenarios,
        "comparisons": compare(scenarios, {n: SCENARIOS[n].transport for n in names}),
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    path = opts.out_dir / f"{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report


def compare(
    scenarios: Mapping[str, Mapping[str, Mapping[str, float]]], transports: Mapping[str, str]
) -> dict[str, dict[str, float | None]]:
    """Added latency over passthrough, and its ratio to the same transport's floor; saturation vs the floor."""
    out: dict[str, dict[str, float | None]] = {}
    base = scenarios.get(BASELINE)
    for name, runs in scenarios.items():
        floor = scenarios.get(FLOOR.get(transports.get(name, ""), ""))
        row: dict[str, float | None] = {}
        for key, med in runs.items():
            if key == "saturation":
                if floor and "saturation" in floor and floor["saturation"]["rps"]:
                    row["saturation_x_floor"] = med["rps"] / floor["saturation"]["rps"]
                continue
            if base is None or key not in base:
                continue
            for q in ("p50", "p99"):
                added = med[f"{q}_ms"] - base[key][f"{q}_ms"]
                row[f"{key}_added_{q}_ms"] = added
                if floor and key in floor:
                    floor_added = floor[key][f"{q}_ms"] - base[key][f"{q}_ms"]
                    row[f"{key}_x_floor_{q}"] = added / floor_added if floor_added > 0 else None
        out[name] = row
    return out


def _short_version(text: str) -> str:
    found = re.search(r"/(\d+\.\d+\.\d+)/", text)
    return found[1] if found else text


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(report: Mapping[str, Any]) -> str:
    """The human summary: one row per scenario and load."""
    lines = [
        f"machine: {report['machine']['cpu_model']}, {report['machine']['nproc']} cores, "
        f"python {report['machine']['python']}, envoy {_short_version(report['machine']['envoy'])}",
        f"layout: {report['layout']}; load generator: {report['load_generator']}",
        f"medians of {report['settings']['rounds']} rounds x {report['settings']['duration']:g} s",
        "",
        f"{'scenario':<15} {'load':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'rps':>9} {'errors':>7} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'xfl p50':>8} {'xfl p99':>8} {'sat xfl':>8}",
    ]
    for name, runs in report["scenarios"].items():
        cmp_row = report["comparisons"].get(name, {})
        for key, med in runs.items():
            sat = key == "saturation"
            lines.append(
                f"{name:<15} {('max' if sat else key + ' rps'):>10} {med['p50_ms']:>8.3f} {med['p90_ms']:>8.3f} "
                f"{med['p99_ms']:>8.3f} {med['rps']:>9.0f} {med['errors']:>7.0f} "
                f"{_fmt(cmp_row.get(f'{key}_added_p50_ms'), '8.3f'):>8} "
                f"{_fmt(cmp_row.get(f'{key}_added_p99_ms'), '8.3f'):>8} "
                f"{_fmt(cmp_row.get(f'{key}_x_floor_p50'), '8.2f'):>8} "
                f"{_fmt(cmp_row.get(f'{key}_x_floor_p99'), '8.2f'):>8} "
                f"{_fmt(cmp_row.get('saturation_x_floor') if sat else None, '8.2f'):>8}"
            )
    lines += [
        "",
        "+p50/+p99: added over passthrough at the same load; xfl: that added latency / its transport floor's;",
        "sat xfl: saturation rps / its transport floor's (saturation shares core 1 with the load generator).",
    ]
    return "\n".join(lines)
