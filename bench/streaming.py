"""The streaming scenarios of issue 3: the closed loop (beside the echo server, batching off and the in-process
model), the open loop at fractions of the closed loop's maximum, and multiplexed StreamBatch messages."""

import collections
import contextlib
import statistics

from bench.harness import BATCH_OFF, ECHO, IN_PROCESS, SERVER, Bench, median_of
from bench.inproc import InProcessModel
from bench.plan import MODELS


def closed(bench: Bench, name: str) -> None:
    """Closed loop: every session sends one step and waits for its answer, beside the echo server,
    batching off and the in-process model at the batch the server formed."""
    input_size = MODELS[name][0]
    rows = []
    batch_off = set(bench.plan.concurrency) & set(bench.plan.batch_off_concurrency)
    with contextlib.ExitStack() as stack:
        on = stack.enter_context(bench.server(name))
        echo = stack.enter_context(bench.echo(name))
        off = stack.enter_context(bench.server(name, "-b1", max_batch_size=1)) if batch_off else None
        for n in bench.plan.concurrency:
            configs = [(ECHO, echo), (SERVER, on)]
            if n in batch_off:
                configs.append((BATCH_OFF, off))
            runs, batches = collections.defaultdict(list), []
            for repeat in range(bench.plan.repeats):
                for config, child in configs:
                    before = (
                        on.metric("lstmserve_batch_size_sum"),
                        on.metric("lstmserve_batch_size_count"),
                    )
                    figures = bench.measure("closed", child.address, n, steps=1, input_size=input_size)
                    runs[config].append(figures)
                    if child is on:
                        batches.append(
                            (on.metric("lstmserve_batch_size_sum") - before[0])
                            / max(1.0, on.metric("lstmserve_batch_size_count") - before[1])
                        )
                    bench.progress(
                        f"closed {name:6s} n={n:<5d} {repeat + 1}/{bench.plan.repeats} "
                        f"{config:12s} {figures['throughput']:9.0f} steps/s "
                        f"p99 {figures['p99'] * 1e3:8.2f} ms"
                    )
            rows.append(
                {
                    "model": name,
                    "sessions": n,
                    "formed_batch": statistics.median(batches),
                    "configs": {config: median_of(r) for config, r in runs.items()},
                }
            )
    model = InProcessModel(bench.model_path(name), bench.plan.torch_threads, bench.plan.device)
    for row in rows:
        batch = max(1, round(row["formed_batch"]))
        row["configs"][IN_PROCESS] = {"throughput": model.steps_per_second(1, batch), "batch": batch}
        bench.progress(
            f"closed {name:6s} n={row['sessions']:<5d} in-process at batch {batch}: "
            f"{row['configs'][IN_PROCESS]['throughput']:9.0f} steps/s"
        )
    bench.results["closed"].extend(rows)


def open_loop(bench: Bench) -> None:
    """Open loop: fixed offered rates, fractions of the closed loop's maximum; latency counts from the
    intended send time."""
    name, n = bench.plan.open_model, bench.plan.open_sessions
    input_size = MODELS[name][0]
    with bench.server(name) as on, bench.echo(name) as echo:
        maximum = _closed_maximum(bench, name, n, on.address, input_size)
        for load in bench.plan.open_load:
            rate = load * maximum
            runs = collections.defaultdict(list)
            for repeat in range(bench.plan.repeats):
                for config, child in ((ECHO, echo), (SERVER, on)):
                    figures = bench.measure(
                        "open", child.address, n, steps=1, input_size=input_size, rate=rate
                    )
                    runs[config].append(figures)
                    bench.progress(
                        f"open   {name} {load:.0%} of {maximum:.0f}/s {repeat + 1}/{bench.plan.repeats} "
                        f"{config:8s} p50 {figures['p50'] * 1e3:.2f} p99 {figures['p99'] * 1e3:.2f} "
                        f"p99.9 {figures['p999'] * 1e3:.2f} ms"
                    )
            bench.results["open"].append(
                {
                    "model": name,
                    "sessions": n,
                    "load": load,
                    "rate": rate,
                    "maximum": maximum,
                    "configs": {c: median_of(r) for c, r in runs.items()},
                }
            )

def _closed_maximum(bench: Bench, name: str, n: int, address: str, input_size: int) -> float:
    """The server's closed-loop throughput at `n` sessions (from this run's closed scenario if it ran)."""
    for row in bench.results["closed"]:
        if row["model"] == name and row["sessions"] == n:
            return row["configs"][SERVER]["throughput"]
    runs = [
        bench.measure("closed", address, n, steps=1, input_size=input_size)["throughput"]
        for _ in range(bench.plan.repeats)
    ]
    return statistics.median(runs)


def multiplexed(bench: Bench) -> None:
    """Many sessions' steps per StreamBatch message, beside the echo server's one-stream-per-session
    ping-pong."""
    name, n = bench.plan.multiplexed_model, bench.plan.multiplexed_sessions
    input_size = MODELS[name][0]
    runs = collections.defaultdict(list)
    with bench.server(name) as on, bench.echo(name) as echo:
        for repeat in range(bench.plan.repeats):
            figures = bench.measure("closed", echo.address, n, steps=1, input_size=input_size)
            runs[("echo ping-pong", 0)].append(figures)
            bench.progress(
                f"multi  {name} {n} sessions {repeat + 1}/{bench.plan.repeats} echo ping-pong "
                f"{figures['throughput']:9.0f} steps/s"
            )
            for streams in bench.plan.multiplexed_streams:
                for config, child in ((ECHO, echo), (SERVER, on)):
                    figures = bench.measure(
                        "batch",
                        child.address,
                        n,
                        clients=1,
                        steps=1,
                        input_size=input_size,
                        streams=streams,
                    )
                    runs[(config, streams)].append(figures)
                    bench.progress(
                        f"multi  {name} {n} sessions {repeat + 1}/{bench.plan.repeats} {config} "
                        f"StreamBatch x{streams} {figures['throughput']:9.0f} steps/s "
                        f"p99 {figures['p99'] * 1e3:.1f} ms"
                    )
    for (config, streams), config_runs in runs.items():
        bench.results["multiplexed"].append(
            {"model": name, "sessions": n, "config": config, "streams": streams, **median_of(config_runs)}
        )
