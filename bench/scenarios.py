"""The scenarios of issue 3, each measured beside its baselines in the same invocation."""

import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import procs
from bench.inproc import InProcessModel
from bench.load import LoadPool
from bench.plan import MODELS, Plan
from server.model.export import build_module, export

SERVER = "server"
ECHO = "echo"
BATCH_OFF = "batching off"
IN_PROCESS = "in-process"
CREATE_PER_MESSAGE = 1000


def summarize(results: list[dict], duration: float) -> dict:
    """Throughput and latency percentiles of one run, over all its client processes."""
    latencies = np.concatenate([r["latencies"] for r in results]) if results else np.array([])
    figures = {
        "throughput": sum(r["steps"] for r in results) / duration if duration else 0.0,
        "dropped": sum(r["dropped"] for r in results),
        "samples": int(latencies.size),
    }
    for name, q in (("p50", 50), ("p99", 99), ("p999", 99.9)):
        figures[name] = float(np.percentile(latencies, q)) if latencies.size else float("nan")
    return figures


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over repeated runs (and the per-run throughputs, to show the spread)."""
    keys = runs[0].keys()
    medians = {k: statistics.median(r[k] for r in runs) for k in keys}
    medians["runs"] = [round(r["throughput"], 1) for r in runs]
    return medians


def split(total: int, parts: int) -> list[int]:
    """`total` sessions over at most `parts` client processes, none empty."""
    parts = max(1, min(parts, total))
    return [len(chunk) for chunk in np.array_split(np.arange(total), parts)]


class Bench:
    def __init__(self, plan: Plan, workdir: Path):
        self.plan = plan
        self.workdir = workdir
        self.pool = LoadPool(plan.clients)
        self.started = time.monotonic()
        self.results: dict[str, list] = collections.defaultdict(list)

    def close(self) -> None:
        self.pool.close()

    def progress(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}", file=sys.stderr, flush=True)

    def model_path(self, name: str) -> Path:
        path = self.workdir / f"{name}.pt"
        if not path.exists():
            input_size, hidden, layers = MODELS[name]
            export(build_module(input_size, hidden, layers, seed=0), path, name=name, version="bench")
        return path

    @contextlib.contextmanager
    def server(self, name: str, tag: str = "", **settings):
        settings.setdefault("torch_threads", self.plan.torch_threads)
        settings.setdefault("device", self.plan.device)
        with procs.lstmserve(self.model_path(name), self.workdir / f"{name}{tag}.log", **settings) as child:
            try:
                yield child
            finally:
                self.pool.forget(child.address)

    @contextlib.contextmanager
    def echo(self, name: str):
        with procs.echo(MODELS[name][1], self.workdir / f"echo-{name}.log") as child:
            try:
                yield child
            finally:
                self.pool.forget(child.address)

    def measure(self, kind: str, address: str, sessions: int, clients: int | None = None, **job) -> dict:
        """One run of `kind` with `sessions` spread over the client processes."""
        counts = split(sessions, clients or self.plan.clients)
        rate = job.pop("rate", None)
        jobs = [
            dict(
                kind=kind,
                address=address,
                sessions=count,
                warmup=self.plan.warmup,
                duration=self.plan.duration,
                **job,
            )
            for count in counts
        ]
        if rate is not None:
            for one, count in zip(jobs, counts, strict=True):
                one["rate"] = rate * count / sessions
        return summarize(self.pool.run(jobs), self.plan.duration)

    # -- streaming, closed loop -------------------------------------------------------------------

    def closed(self, name: str) -> None:
        input_size = MODELS[name][0]
        rows = []
        batch_off = set(self.plan.concurrency) & set(self.plan.batch_off_concurrency)
        with contextlib.ExitStack() as stack:
            on = stack.enter_context(self.server(name))
            echo = stack.enter_context(self.echo(name))
            off = stack.enter_context(self.server(name, "-b1", max_batch_size=1)) if batch_off else None
            for n in self.plan.concurrency:
                configs = [(ECHO, echo), (SERVER, on)]
                if n in batch_off:
                    configs.append((BATCH_OFF, off))
                runs, batches = collections.defaultdict(list), []
                for repeat in range(self.plan.repeats):
                    for config, child in configs:
                        before = (
                            on.metric("lstmserve_batch_size_sum"),
                            on.metric("lstmserve_batch_size_count"),
                        )
                        figures = self.measure("closed", child.address, n, steps=1, input_size=input_size)
                        runs[config].append(figures)
                        if child is on:
                            batches.append(
                                (on.metric("lstmserve_batch_size_sum") - before[0])
                                / max(1.0, on.metric("lstmserve_batch_size_count") - before[1])
                            )
                        self.progress(
                            f"closed {name:6s} n={n:<5d} {repeat + 1}/{self.plan.repeats} "
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
        model = InProcessModel(self.model_path(name), self.plan.torch_threads, self.plan.device)
        for row in rows:
            batch = max(1, round(row["formed_batch"]))
            row["configs"][IN_PROCESS] = {"throughput": model.steps_per_second(1, batch), "batch": batch}
            self.progress(
                f"closed {name:6s} n={row['sessions']:<5d} in-process at batch {batch}: "
                f"{row['configs'][IN_PROCESS]['throughput']:9.0f} steps/s"
            )
        self.results["closed"].extend(rows)

    # -- streaming, open loop ---------------------------------------------------------------------

    def open_loop(self) -> None:
        name, n = self.plan.open_model, self.plan.open_sessions
        input_size = MODELS[name][0]
        with self.server(name) as on, self.echo(name) as echo:
            maximum = self._closed_maximum(name, n, on.address, input_size)
            for load in self.plan.open_load:
                rate = load * maximum
                runs = collections.defaultdict(list)
                for repeat in range(self.plan.repeats):
                    for config, child in ((ECHO, echo), (SERVER, on)):
                        figures = self.measure(
                            "open", child.address, n, steps=1, input_size=input_size, rate=rate
                        )
                        runs[config].append(figures)
                        self.progress(
                            f"open   {name} {load:.0%} of {maximum:.0f}/s {repeat + 1}/{self.plan.repeats} "
                            f"{config:8s} p50 {figures['p50'] * 1e3:.2f} p99 {figures['p99'] * 1e3:.2f} "
                            f"p99.9 {figures['p999'] * 1e3:.2f} ms"
                        )
                self.results["open"].append(
                    {
                        "model": name,
                        "sessions": n,
                        "load": load,
                        "rate": rate,
                        "maximum": maximum,
                        "configs": {c: median_of(r) for c, r in runs.items()},
                    }
                )

    def _closed_maximum(self, name: str, n: int, address: str, input_size: int) -> float:
        """The server's closed-loop throughput at `n` sessions (from this run's closed scenario if it ran)."""
        for row in self.results["closed"]:
            if row["model"] == name and row["sessions"] == n:
                return row["configs"][SERVER]["throughput"]
        runs = [
            self.measure("closed", address, n, steps=1, input_size=input_size)["throughput"]
            for _ in range(self.plan.repeats)
        ]
        return statistics.median(runs)

    # -- multiplexed: many sessions per message -----------------------------------------------------

    def multiplexed(self) -> None:
        name, n = self.plan.multiplexed_model, self.plan.multiplexed_sessions
        input_size = MODELS[name][0]
        runs = collections.defaultdict(list)
        with self.server(name) as on, self.echo(name) as echo:
            for repeat in range(self.plan.repeats):
                figures = self.measure("closed", echo.address, n, steps=1, input_size=input_size)
                runs[("echo ping-pong", 0)].append(figures)
                self.progress(
                    f"multi  {name} {n} sessions {repeat + 1}/{self.plan.repeats} echo ping-pong "
                    f"{figures['throughput']:9.0f} steps/s"
                )
                for streams in self.plan.multiplexed_streams:
                    for config, child in ((ECHO, echo), (SERVER, on)):
                        figures = self.measure(
                            "batch",
                            child.address,
                            n,
                            clients=1,
                            steps=1,
                            input_size=input_size,
                            streams=streams,
                        )
                        runs[(config, streams)].append(figures)
                        self.progress(
                            f"multi  {name} {n} sessions {repeat + 1}/{self.plan.repeats} {config} "
                            f"StreamBatch x{streams} {figures['throughput']:9.0f} steps/s "
                            f"p99 {figures['p99'] * 1e3:.1f} ms"
                        )
        for (config, streams), config_runs in runs.items():
            self.results["multiplexed"].append(
                {"model": name, "sessions": n, "config": config, "streams": streams, **median_of(config_runs)}
            )

    # -- whole sequences --------------------------------------------------------------------------

    def predict(self) -> None:
        name = self.plan.predict_model
        input_size = MODELS[name][0]
        rows = []
        with self.server(name) as on:
            for seq_len, batch in self.plan.predict_shapes:
                seconds = []
                for _ in range(self.plan.repeats):
                    result = self.pool.run(
                        [
                            dict(
                                kind="predict",
                                address=on.address,
                                seq_len=seq_len,
                                batch=batch,
                                input_size=input_size,
                                calls=self.plan.predict_calls,
                            )
                        ]
                    )[0]
                    seconds.append(float(np.median(result["latencies"])))
                rows.append(
                    {
                        "model": name,
                        "seq_len": seq_len,
                        "batch": batch,
                        "server_seconds": statistics.median(seconds),
                        "runs": seconds,
                    }
                )
                self.progress(
                    f"predict {name} seq_len {seq_len} batch {batch}: {rows[-1]['server_seconds'] * 1e3:.1f}"
                    " ms per call over gRPC"
                )
        model = InProcessModel(self.model_path(name), self.plan.torch_threads, self.plan.device)
        for row in rows:
            row["inprocess_seconds"] = model.seconds_per_call(
                row["seq_len"], row["batch"], min_calls=self.plan.predict_calls
            )
            self.progress(
                f"predict {name} seq_len {row['seq_len']} batch {row['batch']}: "
                f"{row['inprocess_seconds'] * 1e3:.1f} ms per call in-process"
            )
        self.results["predict"].extend(rows)

    # -- memory per idle session ------------------------------------------------------------------

    def memory(self) -> None:
        name = self.plan.memory_model
        input_size, hidden, layers = MODELS[name]
        ceiling = max(self.plan.memory_sessions)
        with self.server(
            name,
            "-memory",
            max_sessions=ceiling,
            idle_timeout=3600,
            max_queued_requests=max(100_000, CREATE_PER_MESSAGE),
        ) as on:
            time.sleep(0.5)
            baseline, created = on.rss_bytes(), 0
            for target in self.plan.memory_sessions:
                self.pool.run(
                    [
                        dict(
                            kind="create",
                            address=on.address,
                            sessions=target - created,
                            per_message=min(CREATE_PER_MESSAGE, target - created),
                            input_size=input_size,
                        )
                    ]
                )
                created = target
                live = int(on.metric("lstmserve_live_sessions"))
                grown = on.rss_bytes() - baseline
                self.results["memory"].append(
                    {
                        "model": name,
                        "sessions": created,
                        "live_sessions": live,
                        "rss_growth_bytes": grown,
                        "bytes_per_session": grown / created,
                        "raw_state_bytes": 2 * layers * hidden * 4,
                    }
                )
                self.progress(
                    f"memory {name} {created} sessions: {grown / created:.0f} bytes each "
                    f"(raw state {2 * layers * hidden * 4})"
                )
