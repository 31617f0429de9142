"""What each durability mode of the Redis state store costs: closed-loop streaming against `none`."""

import collections
import contextlib

from bench.harness import Bench, median_of
from bench.plan import MODELS
from bench.tables import configs_table
from server.testing.redis_server import redis_server

MODES = ("none", "checkpoint", "every-step")


def run(bench: Bench) -> None:
    """One server per mode on one real redis-server (a unix socket), measured in turns, same client code."""
    name = bench.plan.durability_model
    input_size = MODELS[name][0]
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server(bench.workdir))
        servers = {mode: stack.enter_context(bench.server(
            name, f"-{mode}", **({} if mode == "none" else {"state_store": redis.url, "durability": mode})))
            for mode in MODES}
        for n in bench.plan.durability_sessions:
            runs = collections.defaultdict(list)
            for repeat in range(bench.plan.repeats):
                for mode, child in servers.items():
                    figures = bench.measure("closed", child.address, n, steps=1, input_size=input_size)
                    runs[mode].append(figures)
                    bench.progress(f"durability {name} n={n:<4d} {repeat + 1}/{bench.plan.repeats} {mode:10s} "
                                   f"{figures['throughput']:8.0f} steps/s p99 {figures['p99'] * 1e3:7.2f} ms")
            bench.results["durability"].append(
                {"model": name, "sessions": n, "configs": {mode: median_of(r) for mode, r in runs.items()}})


def markdown(results: dict) -> str:
    table = configs_table(results.get("durability", []), MODES, "mode")
    return table and ("### Durability modes (closed loop, Redis on a unix socket; ratios against `none`)\n\n"
                      + table)
