"""What every scenario runs on: the Bench (the plan, model files, servers and echo servers, the client pool and the
results) and the figures of a run (throughput, latency percentiles, medians over repeats)."""

import collections
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench import procs
from bench.load import LoadPool
from bench.plan import MODELS, Plan
from server.model.export import build_module, export

SERVER = "server"
ECHO = "echo"
BATCH_OFF = "batching off"
IN_PROCESS = "in-process"


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
    """One bench invocation: the plan, a work directory (model files, logs), the client pool, the results by
    scenario."""
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
