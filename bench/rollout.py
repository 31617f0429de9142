"""A new model version rolls out under closed-loop streaming load (issue 13): steps/s and p99 in the window
around the switch against the steady state before it in the same run, steps lost, and the server's RSS after
the old version is unloaded against before the new one was loaded.

One server on a model repository. Each run exports the next version into the repository (whole, as the
exporter writes it), streams `sessions` sessions that turn over every `rollout_lifetime` seconds, and sends
the server SIGHUP in the middle of the switch window: the new version loads beside the old one and takes the
new sessions, the old one drains as its sessions end and is unloaded after the last.
"""

import signal
import threading
import time

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from bench.harness import Bench, median_of, split, summarize
from bench.plan import MODELS
from bench.tables import _ms, _n, _ratio, _table
from server.model.export import build_module, export_to_repository

P99_BOUND = 2.0  # p99 around the switch / steady (issue 13)
RSS_BOUND = 1.1  # RSS after the unload / before the load: the old version's memory is returned, give or take
UNLOAD_WAIT = 60.0  # seconds the bench waits for the old version to be unloaded after the run


def run(bench: Bench) -> None:
    name = bench.plan.rollout_model
    repository = bench.workdir / "rollout-repository"
    version = 1
    _add_version(repository, name, version)
    with bench.server(name, "-rollout", model_repository=repository, idle_timeout=3600) as on:
        for n in bench.plan.rollout_sessions:
            runs = []
            for repeat in range(bench.plan.repeats):
                version += 1
                runs.append(switch_under_load(bench, on, repository, name, version, n))
                steady, switch = runs[-1]["steady"], runs[-1]["switch"]
                bench.progress(f"rollout {name} n={n:<4d} {repeat + 1}/{bench.plan.repeats} to version {version}: "
                               f"steady {steady['throughput']:7.0f} steps/s p99 {steady['p99'] * 1e3:6.2f} ms, "
                               f"switch {switch['throughput']:7.0f} steps/s p99 {switch['p99'] * 1e3:6.2f} ms, "
                               f"lost {runs[-1]['lost']}, RSS after/before {runs[-1]['rss_ratio']:.2f}")
            bench.results["rollout"].append({
                "model": name, "sessions": n,
                "configs": {window: median_of([r[window] for r in runs]) for window in ("steady", "switch")},
                **{key: float(np.median([r[key] for r in runs])) for key in (
                    "ready_after", "unloaded_after", "rss_before", "rss_both", "rss_after", "rss_ratio")},
                "lost": sum(r["lost"] for r in runs), "errors": [e for r in runs for e in r["errors"]][:10]})


def _add_version(repository, name: str, version: int) -> None:
    input_size, hidden, layers = MODELS[name]
    export_to_repository(build_module(input_size, hidden, layers, seed=version), repository, name, str(version))


def switch_under_load(bench: Bench, on, repository, name: str, version: int, sessions: int) -> dict:
    """One run: warm-up, steady window, then the switch window with SIGHUP in its middle."""
    plan = bench.plan
    _add_version(repository, name, version)  # not read before SIGHUP: the server does not poll here
    warmup = plan.warmup + plan.rollout_lifetime  # sessions turning over at their even pace
    switch_at = warmup + plan.rollout_steady + plan.rollout_window / 2
    jobs = [dict(kind="turnover", address=on.address, sessions=count, warmup=0.0,
                 duration=warmup + plan.rollout_steady + plan.rollout_window, steps=1,
                 input_size=MODELS[name][0], lifetime=plan.rollout_lifetime)
            for count in split(sessions, plan.clients)]
    switch = Switch(on, version)
    started = []
    results = bench.pool.run(jobs, started=lambda at: (started.append(at), switch.at(at + switch_at)))
    switch.join(UNLOAD_WAIT)
    steady_from = started[0] + warmup
    hup = switch.sent
    return {
        "steady": window(results, steady_from, steady_from + plan.rollout_steady),
        "switch": window(results, hup - plan.rollout_window / 2, hup + plan.rollout_window / 2),
        "lost": sum(r["error_count"] + r["unanswered"] for r in results),
        "errors": [e for r in results for e in r["errors"]],
        "ready_after": switch.ready - hup, "unloaded_after": switch.unloaded - hup,
        "rss_before": switch.rss["before"], "rss_both": switch.rss["both"], "rss_after": switch.rss["after"],
        "rss_ratio": switch.rss["after"] / switch.rss["before"]}


def window(results: list[dict], start: float, end: float) -> dict:
    """Steps/s and latency percentiles of the answers that arrived in [start, end)."""
    inside = [(r["times"] >= start) & (r["times"] < end) for r in results]
    return summarize([{"latencies": r["latencies"][i], "steps": int(r["steps"][i].sum()), "dropped": 0}
                      for r, i in zip(results, inside, strict=True)], end - start)


class Switch:
    """SIGHUP to the server at a given moment, then the moments the new version is READY and the old one
    unloaded (from ListModels), with the server's RSS before the signal, with both loaded, and after."""

    def __init__(self, on, version: int):
        self._on, self._version = on, version
        self.sent = self.ready = self.unloaded = float("nan")
        self.rss: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    def at(self, moment: float) -> None:
        self._thread = threading.Thread(target=self._run, args=(moment,), name="rollout-switch", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive() or np.isnan(self.unloaded):
            raise RuntimeError(f"version {self._version - 1} was not unloaded within {timeout:.0f} s of the run")
        self.rss["after"] = self._on.rss_bytes()  # at the end of the run: the unload has finished by then

    def _run(self, moment: float) -> None:
        time.sleep(max(0.0, moment - time.monotonic()))
        self.rss["before"] = self._on.rss_bytes()
        self.sent = time.monotonic()
        self._on.process.send_signal(signal.SIGHUP)
        with grpc.insecure_channel(self._on.address) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            deadline = self.sent + 2 * UNLOAD_WAIT
            while time.monotonic() < deadline and np.isnan(self.unloaded):
                states = {m.version: m for m in stub.ListModels(pb.ListModelsRequest()).models}
                now = time.monotonic()
                new, old = states.get(self._version), states[self._version - 1]
                if np.isnan(self.ready) and new is not None and new.state == pb.ModelVersionStatus.READY:
                    self.ready, self.rss["both"] = now, self._on.rss_bytes()
                if old.state == pb.ModelVersionStatus.UNAVAILABLE:
                    self.unloaded = now  # marked as the unload starts: its memory goes when the engine has stopped
                time.sleep(0.05)


def markdown(results: dict) -> str:
    rows = []
    for row in results.get("rollout", []):
        steady, switch = row["configs"]["steady"], row["configs"]["switch"]
        rows.append([row["model"], row["sessions"], _n(steady["throughput"]), _n(switch["throughput"]),
                     _n(_ratio(switch["throughput"], steady["throughput"]), 2), _ms(steady["p99"]),
                     _ms(switch["p99"]), _n(_ratio(switch["p99"], steady["p99"]), 2), row["lost"],
                     _n(row["ready_after"], 2), _n(row["unloaded_after"], 2), _n(row["rss_before"] / 2**20, 1),
                     _n(row["rss_both"] / 2**20, 1), _n(row["rss_after"] / 2**20, 1), _n(row["rss_ratio"], 2)])
    if not rows:
        return ""
    return ("\n### Roll-out (closed loop, sessions turning over; a new version switched in by SIGHUP)\n\n"
            + _table(["model", "sessions", "steady steps/s", "switch steps/s", "ratio", "steady p99",
                      "switch p99", "p99 ratio", "steps lost", "new READY after (s)", "old unloaded after (s)",
                      "RSS before (MiB)", "both loaded", "after unload", "after / before"], rows) + "\n")
