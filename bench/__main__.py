"""`python -m bench [--quick]`: every scenario of issue 3 on loopback, then a table, JSON and a plot."""

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import callers, columnar, durability, memory, plots, predict, report, rollout, streaming, tracing
from bench.harness import Bench
from bench.plan import MODELS, SCENARIOS, Plan

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a reduced plan that runs in under two minutes")
    parser.add_argument("--models", help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--concurrency", help="comma-separated session counts for the closed loop")
    parser.add_argument(
        "--device", help="torch device for the servers and the in-process model (cuda, cuda:N)"
    )
    parser.add_argument("--clients", type=int, help="client processes (default 1: see docs/benchmarks.md)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="directory for results.json, table.md, plot.png"
    )
    args = parser.parse_args(argv)
    for name, allowed in (("models", MODELS), ("scenarios", SCENARIOS)):
        chosen = tuple(getattr(args, name).split(",")) if getattr(args, name) else None
        if chosen and not set(chosen) <= set(allowed):
            parser.error(f"--{name}: choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    return args


def build_plan(args: argparse.Namespace) -> Plan:
    plan = (Plan.quick() if args.quick else Plan()).restricted(args.models, args.scenarios)
    if args.concurrency:
        plan = dataclasses.replace(plan, concurrency=tuple(int(n) for n in args.concurrency.split(",")))
    if args.device:
        plan = dataclasses.replace(plan, device=args.device)
    if args.clients:
        plan = dataclasses.replace(plan, clients=args.clients)
    return plan


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


def tables(results: dict) -> str:
    """Every scenario's tables, one blank line apart."""
    parts = (module.markdown(results) for module in (report, columnar, callers, durability, tracing, rollout))
    return "\n\n".join(part.strip("\n") for part in parts if part.strip()) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    args.out.mkdir(parents=True, exist_ok=True)
    at_start = machine()
    with tempfile.TemporaryDirectory(prefix="lstmserve-bench-") as workdir:
        bench = Bench(plan, Path(workdir))
        runs = [(f"closed {name}", lambda name=name: streaming.closed(bench, name))
                for name in plan.models if "closed" in plan.scenarios]
        runs += [(scenario, run) for scenario, run in (
            ("open", lambda: streaming.open_loop(bench)),
            ("multiplexed", lambda: streaming.multiplexed(bench)),
            ("columnar", lambda: columnar.run(bench)),
            ("predict", lambda: predict.run(bench)),
            ("merged", lambda: callers.merged(bench)),
            ("oip", lambda: callers.oip(bench)),
            ("memory", lambda: memory.run(bench)),
            ("durability", lambda: durability.run(bench)),
            ("tracing", lambda: tracing.run(bench)),
            ("rollout", lambda: rollout.run(bench)),
        ) if scenario in plan.scenarios]
        failed = {}
        try:
            for scenario, run in runs:
                try:
                    run()
                except Exception as error:  # noqa: BLE001 - one broken scenario must not discard the others
                    traceback.print_exc()
                    failed[scenario] = repr(error)
                    bench.progress(f"{scenario} FAILED: {error!r}; going on with the rest")
        finally:
            bench.close()
        results = {
            "machine": {**at_start, "load_average_at_end": os.getloadavg()},
            "plan": dataclasses.asdict(plan),
            "seconds": time.monotonic() - bench.started,
            "failed": failed,
            **bench.results,
        }
    table = tables(results)
    print(table)
    report.write_json(results, args.out / "results.json")
    (args.out / "table.md").write_text(table)
    if plots.plot(results, args.out / "plot.png"):
        print(f"plot: {args.out / 'plot.png'}", file=sys.stderr)
    if callers.plot(results, args.out / "plot-callers.png"):
        print(f"plot: {args.out / 'plot-callers.png'}", file=sys.stderr)
    print(f"results: {args.out / 'results.json'} ({results['seconds']:.0f} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
