"""Load generators: Fortio when on PATH, else h2load (Debian nghttp2-client); one parser each.

Every run is bounded: a fixed duration, and a subprocess timeout of duration + 30 s.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LoadError(RuntimeError):
    """No load generator, or it failed."""


@dataclass(frozen=True)
class LoadResult:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    rps: float  # achieved
    requests: int  # completed
    errors: int  # completed with a non-2xx status, or failed/errored/timed out


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of already sorted values; 0.0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


# ---- Fortio -------------------------------------------------------------------------------------------------


def parse_fortio_json(data: Mapping[str, Any]) -> LoadResult:
    """Fortio's ``-json`` output: DurationHistogram.Percentiles (seconds), ActualQPS, RetCodes."""
    hist = data["DurationHistogram"]
    pct = {float(p["Percentile"]): float(p["Value"]) * 1000.0 for p in hist.get("Percentiles") or []}

    def at(q: float) -> float:
        if q not in pct:
            raise LoadError(f"Fortio JSON has no p{q:g}; run it with -p '50,90,99'")
        return pct[q]

    codes = {str(k): int(v) for k, v in (data.get("RetCodes") or {}).items()}
    ok = sum(n for code, n in codes.items() if code.startswith("2"))
    count = int(hist.get("Count", sum(codes.values())))
    return LoadResult(
        p50_ms=at(50),
        p90_ms=at(90),
        p99_ms=at(99),
        rps=float(data["ActualQPS"]),
        requests=count,
        errors=max(count - ok, 0),
    )


def _run_fortio(
    url: str, rate: int | None, duration: float, connections: int, headers: Mapping[str, str], cpu: int | None
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        out = Path(tmp) / "fortio.json"
        cmd = ["fortio", "load", "-qps", str(rate or 0), "-c", str(connections), "-t", f"{duration:g}s"]
        cmd += ["-p", "50,90,99", "-json", str(out), "-quiet"]
        for name, value in headers.items():
            cmd += ["-H", f"{name}: {value}"]
        _run([*_pin(cpu), *cmd, url], duration)
        return parse_fortio_json(json.loads(out.read_text()))


# ---- h2load -------------------------------------------------------------------------------------------------

_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")


def parse_h2load(stdout: str, log_text: str) -> LoadResult:
    """h2load's summary (counts, req/s) + its ``--log-file`` (start µs, status, duration µs per request)."""
    finished, requests, codes = _FINISHED.search(stdout), _REQUESTS.search(stdout), _CODES.search(stdout)
    if not (finished and requests and codes):
        raise LoadError(f"unexpected h2load output:\n{stdout[-800:]}")
    durations: list[float] = []
    for line in log_text.splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and int(cols[1]) > 0:  # failed requests have no status
            durations.append(int(cols[2]) / 1000.0)
    durations.sort()
    done, errored, timeout = int(requests[3]), int(requests[6]), int(requests[7])
    ok = int(codes[1])
    return LoadResult(
        p50_ms=percentile(durations, 50),
        p90_ms=percentile(durations, 90),
        p99_ms=percentile(durations, 99),
        rps=float(finished[3]),
        requests=done,
        errors=max(done - ok, 0) + errored + timeout,
    )


def _run_h2load(
    url: str, rate: int | None, duration: float, connections: int, headers: Mapping[str, str], cpu: int | None
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="meshgate-bench-") as tmp:
        log = Path(tmp) / "h2load.log"  # h2load appends: always a fresh file
        cmd = ["h2load", "--h1", "-c", str(connections), "-D", f"{round(duration * 1000)}ms", "--log-file", str(log)]
        if rate:
            cmd += ["--rps", str(max(1, rate // connections))]  # h2load's rate is per connection
        for name, value in headers.items():
            cmd += ["-H", f"{name}: {value}"]
        stdout = _run([*_pin(cpu), *cmd, url], duration)
        return parse_h2load(stdout, log.read_text() if log.exists() else "")


# ---- shared -------------------------------------------------------------------------------------------------


def _pin(cpu: int | None) -> list[str]:
    taskset = shutil.which("taskset") if cpu is not None else None
    return [taskset, "-c", str(cpu)] if taskset else []


def _run(cmd: list[str], duration: float) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    except subprocess.TimeoutExpired:
        raise LoadError(f"{cmd[0]} did not finish within {duration + 30:.0f} s") from None
    if out.returncode != 0:
        raise LoadError(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{(out.stderr or out.stdout)[-800:]}")
    return out.stdout


def tool() -> str:
    """The load generator this machine will use: ``fortio`` or ``h2load``."""
    for name in ("fortio", "h2load"):
        if shutil.which(name):
            return name
    raise LoadError("no load generator: install fortio, or h2load (apt-get install -y nghttp2-client)")


def tool_version(name: str) -> str:
    args = [name, "version"] if name == "fortio" else [name, "--version"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else name


def run_load(
    url: str,
    *,
    rate: int | None,
    duration: float,
    connections: int,
    headers: Mapping[str, str] | None = None,
    cpu: int | None = None,
) -> LoadResult:
    """Drive ``url`` at ``rate`` rps (None = as fast as ``connections`` allow) for ``duration`` seconds."""
    runner = _run_fortio if tool() == "fortio" else _run_h2load
    return runner(url, rate, duration, connections, dict(headers or {}), cpu)
