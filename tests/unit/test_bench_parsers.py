"""bench.loadgen parsers: Fortio's -json output and h2load's summary + --log-file, from recorded samples."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bench import runner
from bench.loadgen import LoadError, parse_fortio_json, parse_h2load, percentile
from bench.runner import compare

SAMPLES = Path(__file__).resolve().parents[2] / "bench" / "samples"


def test_fortio_sample() -> None:
    result = parse_fortio_json(json.loads((SAMPLES / "fortio.json").read_text()))
    assert result.p50_ms == pytest.approx(0.328)
    assert result.p90_ms == pytest.approx(0.483)
    assert result.p99_ms == pytest.approx(1.044)
    assert result.rps == pytest.approx(499.93)
    assert result.requests == 15000
    assert result.errors == 6  # the 403s and 503s


def test_fortio_without_needed_percentile() -> None:
    data = json.loads((SAMPLES / "fortio.json").read_text())
    data["DurationHistogram"]["Percentiles"] = [{"Percentile": 50, "Value": 0.001}]
    with pytest.raises(LoadError, match="p90"):
        parse_fortio_json(data)


def test_h2load_sample() -> None:
    stdout = (SAMPLES / "h2load-stdout.txt").read_text()
    log = (SAMPLES / "h2load-log.tsv").read_text()
    result = parse_h2load(stdout, log)
    durations = sorted(int(line.split("\t")[2]) / 1000 for line in log.splitlines())
    assert result.requests == 20
    assert result.errors == 0
    assert result.rps == pytest.approx(20.0)
    assert result.p50_ms == percentile(durations, 50)
    assert result.p99_ms == max(durations)
    assert result.p50_ms <= result.p90_ms <= result.p99_ms


def test_h2load_counts_errors_and_skips_failed_lines() -> None:
    stdout = (
        "finished in 2.00s, 500.00 req/s, 186.04KB/s\n"
        "requests: 1000 total, 1000 started, 998 done, 990 succeeded, 10 failed, 2 errored, 0 timeout\n"
        "status codes: 990 2xx, 0 3xx, 5 4xx, 3 5xx\n"
    )
    log = "1\t200\t1000\n2\t503\t3000\n3\t-1\t99999\n4\t200\t2000\n"
    result = parse_h2load(stdout, log)
    assert result.errors == 8 + 2  # non-2xx done + errored
    assert result.p99_ms == 3.0  # the -1 (failed) line is not a latency sample
    assert result.p50_ms == 2.0


def test_h2load_garbage() -> None:
    with pytest.raises(LoadError, match="unexpected h2load output"):
        parse_h2load("connect refused", "")


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) == 0.0


def test_compare_ratios() -> None:
    def med(p50: float, p99: float, rps: float = 500.0, cpu_us: float = 0.0) -> dict[str, float]:
        return {"p50_ms": p50, "p90_ms": p50, "p99_ms": p99, "rps": rps, "errors": 0, "requests": 1, "cpu_us": cpu_us}

    scenarios = {
        "passthrough": {"500": med(0.3, 1.0), "saturation": med(1, 1, 10000)},
        "floor-http": {"500": med(0.5, 1.4, cpu_us=20), "saturation": med(1, 1, 8000)},
        "extauthz-http": {"500": med(0.6, 1.8, cpu_us=50), "saturation": med(1, 1, 4000)},
    }
    references = {"passthrough": None, "floor-http": "floor-http", "extauthz-http": "floor-http"}
    rows = compare(scenarios, references)
    assert rows["extauthz-http"]["500_added_p50_ms"] == pytest.approx(0.3)
    assert rows["extauthz-http"]["500_x_ref_p50"] == pytest.approx(1.5)
    assert rows["extauthz-http"]["500_x_ref_p99"] == pytest.approx(2.0)
    assert rows["extauthz-http"]["500_raw_x_ref_p99"] == pytest.approx(1.8 / 1.4)
    assert rows["extauthz-http"]["saturation_x_ref"] == pytest.approx(0.5)
    assert rows["extauthz-http"]["500_cpu_x_ref"] == pytest.approx(2.5)
    assert "saturation_cpu_x_ref" not in rows["extauthz-http"]  # no CPU figure: no ratio
    assert rows["floor-http"]["500_x_ref_p50"] == pytest.approx(1.0)
    assert "saturation_x_ref" not in rows["passthrough"]
    # A reference that adds nothing (passthrough itself): no added-latency ratio, saturation ratio still given.
    both = compare(
        {**scenarios, "both": {"500": med(0.9, 2.0), "saturation": med(1, 1, 2000)}}, {"both": "passthrough"}
    )
    assert both["both"]["500_x_ref_p50"] is None
    assert both["both"]["saturation_x_ref"] == pytest.approx(0.2)


def test_process_cpu_counts_this_process_and_ignores_gone_ones() -> None:
    before = runner.process_cpu_s([os.getpid()])
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # bounded: 50 ms of CPU
        pass
    after = runner.process_cpu_s([os.getpid()])
    assert after > before  # the kernel counts in clock ticks (10 ms): 50 ms of work always shows
    assert runner.process_cpu_s([2**22 + 7]) == 0.0  # above pid_max: never a live process


def test_paired_ratios_are_taken_round_by_round() -> None:
    def run(p50: float, rps: float = 500.0, cpu_us: float = 10.0) -> dict[str, float]:
        return {"p50_ms": p50, "p99_ms": p50 * 2, "rps": rps, "cpu_us": cpu_us}

    # Round 2 is slow for everyone (the machine got busy): the paired ratio stays put, a ratio of medians would not.
    rounds = {
        "passthrough": {"500": [run(0.3), run(0.9), run(0.3)], "saturation": [run(1, 9000)] * 3},
        "floor-http": {"500": [run(0.5), run(1.1), run(0.5)], "saturation": [run(1, 8000), run(1, 4000), run(1, 8000)]},
        "extauthz-http": {
            "500": [run(0.6, cpu_us=30), run(1.2, cpu_us=20), run(0.7, cpu_us=30)],
            "saturation": [run(1, 7600), run(1, 3800), run(1, 7200)],
        },
    }
    references = {"passthrough": None, "floor-http": "floor-http", "extauthz-http": "floor-http"}
    rows = runner.paired(rounds, references)
    assert set(rows) == {"extauthz-http"}  # a scenario is not paired with itself, and passthrough has no reference
    row = rows["extauthz-http"]
    assert row["500_x_ref_p50"] == pytest.approx({"median": 1.5, "min": 1.5, "max": 2.0})
    assert row["saturation_x_ref"] == pytest.approx({"median": 0.95, "min": 0.9, "max": 0.95})
    assert row["500_cpu_x_ref"] == pytest.approx({"median": 3.0, "min": 2.0, "max": 3.0})
    assert row["500_raw_x_ref_p99"] == pytest.approx({"median": 1.2, "min": 1.09, "max": 1.4}, abs=0.005)
    lines = runner._paired_lines({"paired": rows, "references": references})
    ours = [line for line in lines if line.startswith("extauthz-http vs floor-http: ")]
    assert len(ours) == 1 and "saturation 0.95 [0.90-0.95]" in ours[0]


def test_layout_says_where_redis_runs() -> None:
    assert runner.describe_layout(0, 1, "service").startswith("envoy: core 0; upstream, services, redis-server")
    assert runner.describe_layout(0, 1, "envoy").startswith("envoy, redis-server: core 0;")
    assert runner.describe_layout(None, None, "envoy") == "unpinned (single core)"


def test_table_shows_each_scenarios_cpu_and_envoys() -> None:
    def med(cpu_us: float, envoy_cpu_us: float | None) -> dict[str, float]:
        figures = {"p50_ms": 1.0, "p90_ms": 1.0, "p99_ms": 2.0, "rps": 500.0, "errors": 0, "cpu_us": cpu_us}
        return figures if envoy_cpu_us is None else {**figures, "envoy_cpu_us": envoy_cpu_us}

    report = {
        "machine": {"cpu_model": "test cpu", "nproc": 2, "python": "3.11", "envoy": "envoy 1.30"},
        "layout": "envoy: core 0",
        "load_generator": "h2load",
        "settings": {"rounds": 1, "duration": 1.0},
        "scenarios": {"floor-http": {"500": med(20, 366.7)}, "older": {"500": med(30, None)}},
        "comparisons": {},
        "references": {},
        "paired": {},
    }
    lines = runner.table(report).splitlines()
    assert lines[4].endswith("envoy us")
    floor = next(line for line in lines if line.startswith("floor-http"))
    assert floor.split()[-3:] == ["20", "-", "367"]  # CPU per request of the service, no ratio, Envoy's
    older = next(line for line in lines if line.startswith("older"))  # results from before the column: "-"
    assert older.split()[-1] == "-"
