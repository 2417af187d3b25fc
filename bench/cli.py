"""``python -m bench run [--rounds N] [--duration S] [--rates 500,2000] [--scenarios a,b] [--quick]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.loadgen import LoadError
from bench.runner import RESULTS_DIR, Options, run, table
from bench.scenarios import DEFAULT, SCENARIOS


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the scenarios through a real Envoy and report medians")
    p.add_argument("--rounds", type=int, help="rounds of all scenarios, alternated (default 3)")
    p.add_argument("--duration", type=float, help="seconds per load run (default 10)")
    p.add_argument("--rates", help="fixed request rates, comma-separated (default 500,2000)")
    p.add_argument("--scenarios", help=f"comma-separated, from: {', '.join(SCENARIOS)} (default {','.join(DEFAULT)})")
    p.add_argument("--no-saturation", action="store_true", help="skip the as-fast-as-possible runs")
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS_DIR}; --quick: bench/results/tmp)")
    p.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 500 rps: a smoke test (~1.5 min)")
    p.add_argument(
        "--redis-core",
        choices=("service", "envoy"),
        default="service",
        help="the core redis-server runs on: the services' (default) or Envoy's (Redis on a machine of its own)",
    )
    args = parser.parse_args(argv)

    scenarios = _csv(args.scenarios) if args.scenarios else list(DEFAULT)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    if "passthrough" not in scenarios:
        scenarios.insert(0, "passthrough")  # every comparison is against it
    quick = args.quick
    opts = Options(
        scenarios=scenarios,
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (3.0 if quick else 10.0),
        rates=[int(r) for r in _csv(args.rates)] if args.rates else ([500] if quick else [500, 2000]),
        saturation=not args.no_saturation,
        warmup=0.5 if quick else 1.0,
        out_dir=args.out or (RESULTS_DIR / "tmp" if quick else RESULTS_DIR),
        redis_core=args.redis_core,
    )
    if opts.rounds < 1 or opts.duration <= 0 or not opts.rates or min(opts.rates) <= 0:
        parser.error("--rounds, --duration and --rates must be positive")
    try:
        report = run(opts)
    except (LoadError, RuntimeError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(table(report))
    print(f"\nresults: {report['path']}")
