"""Every Prometheus metric the server exports, registered on a registry passed in."""

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The settings (`limit` label values) that make room by evicting under --full-policy evict, and all those a
# request can be refused for. Exported at 0 from the start: a counter's series that appears only at its first
# increment has no rate or increase for that increment, and no data in a dashboard before it.
EVICTING_LIMITS = ("max_sessions", "max_state_bytes", "max_sessions_per_owner")
REFUSING_LIMITS = (*EVICTING_LIMITS, "max_queued_requests", "rate_limit", "max_steps_per_request",
                   "max_sequence_length", "max_batch_size")
# Labels of the series one model version's engine records. Bounded: a version's label sets exist while it is
# loaded (Metrics.for_model) and are removed when it is unloaded (ModelMetrics.forget).
MODEL_LABELS = ("model", "version")


class Metrics:
    """Recorded in two places only: the RPC interceptor and the engine."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.rpcs = Counter("lstmserve_rpcs_total", "RPCs finished, by method and gRPC status code",
                            ["method", "code"], registry=registry)
        self.rpc_latency = Histogram("lstmserve_rpc_latency_seconds", "RPC duration (whole stream for streams)",
                                     ["method"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.live_sessions = Gauge("lstmserve_live_sessions", "Sessions currently open, by model version",
                                   MODEL_LABELS, registry=registry)
        self.sessions_created = Counter("lstmserve_sessions_created_total", "Sessions opened", MODEL_LABELS,
                                        registry=registry)
        self.sessions_closed = Counter("lstmserve_sessions_closed_total", "Sessions closed by their client",
                                       MODEL_LABELS, registry=registry)
        self.sessions_expired = Counter("lstmserve_sessions_expired_total", "Sessions expired after idling",
                                        MODEL_LABELS, registry=registry)
        self.sessions_evicted = Counter("lstmserve_sessions_evicted_total",
                                        "Idle sessions closed to make room, by the limit reached",
                                        ["limit"], registry=registry)
        self.limit_refusals = Counter("lstmserve_limit_refusals_total",
                                      "Requests refused with RESOURCE_EXHAUSTED, by the limit reached",
                                      ["limit"], registry=registry)
        for limit in EVICTING_LIMITS:
            self.sessions_evicted.labels(limit)
        for limit in REFUSING_LIMITS:
            self.limit_refusals.labels(limit)
        self.steps_applied = Counter("lstmserve_steps_applied_total", "Time steps applied to session state",
                                     MODEL_LABELS, registry=registry)
        self.batch_size = Histogram("lstmserve_batch_size", "Sessions per model call", MODEL_LABELS,
                                    buckets=_BATCH_BUCKETS, registry=registry)
        self.queue_wait = Histogram("lstmserve_queue_wait_seconds", "Time a request waited for its batch",
                                    MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.compute_time = Histogram("lstmserve_model_compute_seconds", "Duration of one batched model call",
                                      MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.state_store_errors = Counter("lstmserve_state_store_errors_total",
                                          "State store operations that failed (unreachable or timed out)",
                                          registry=registry)
        self.checkpoint_writes_in_flight = Gauge(
            "lstmserve_checkpoint_writes_in_flight",
            "Checkpoint writes sent to the state store in the background and not yet answered", registry=registry)
        self.predict_merged = Counter("lstmserve_predict_merged_total",
                                      "Predict requests that shared their model call with others (merged on the "
                                      "batch axis)", MODEL_LABELS, registry=registry)
        self.model_failures = Counter("lstmserve_model_failures_total", "Model calls that raised",
                                      MODEL_LABELS, registry=registry)

    def for_model(self, model: str, version: str) -> "ModelMetrics":
        """The per-model series of one loaded model version, for its engine to record."""
        return ModelMetrics(self, model, version)

    def model_totals(self, model: str, version: str) -> tuple[int, int, float]:
        """Batched model calls, time steps applied to sessions and seconds spent in those calls, so far, by one
        model version (zeros for a version never loaded, or unloaded since)."""
        labels = {"model": model, "version": version}

        def value(name: str) -> float:
            return self.registry.get_sample_value(name, labels) or 0.0

        return (int(value("lstmserve_batch_size_count")), int(value("lstmserve_steps_applied_total")),
                value("lstmserve_model_compute_seconds_sum"))

    def watch_versions(self, states: Sequence[str], versions: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Exports lstmserve_model_versions{model, state}: how many versions of each model are in each state,
        read from `versions()` ((model, state) pairs) at every scrape, every state of a known model included."""
        self.registry.register(_VersionStates(states, versions))


class ModelMetrics:
    """One model version's view of the metrics: its labelled series under the names the engine records, and the
    server-wide ones (evictions and limit refusals span models, as the per-principal limits do)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._labelled = [metrics.live_sessions, metrics.sessions_created, metrics.sessions_closed,
                          metrics.sessions_expired, metrics.steps_applied, metrics.batch_size,
                          metrics.queue_wait, metrics.compute_time, metrics.model_failures, metrics.predict_merged]
        self._labels = (model, version)
        (self.live_sessions, self.sessions_created, self.sessions_closed, self.sessions_expired,
         self.steps_applied, self.batch_size, self.queue_wait, self.compute_time,
         self.model_failures, self.predict_merged) = (metric.labels(model, version) for metric in self._labelled)
        self.sessions_evicted = metrics.sessions_evicted
        self.limit_refusals = metrics.limit_refusals
        self.state_store_errors = metrics.state_store_errors

    def forget(self) -> None:
        """Removes this version's series (on unload), so label sets stay bounded by the loaded versions."""
        for metric in self._labelled:
            try:
                metric.remove(*self._labels)
            except KeyError:  # forgotten already: unloading twice is harmless
                pass


class _VersionStates(Collector):
    """lstmserve_model_versions, computed at scrape time from the registry's view of its versions."""

    def __init__(self, states: Sequence[str], versions: Callable[[], Iterable[tuple[str, str]]]):
        self._states = tuple(states)
        self._versions = versions

    def collect(self):
        counts = Tally(self._versions())
        family = GaugeMetricFamily("lstmserve_model_versions", "Model versions in each state, by model",
                                   labels=["model", "state"])
        for model in sorted({model for model, _ in counts}):
            for state in self._states:
                family.add_metric([model, state], counts[(model, state)])
        yield family


def observe_all(histogram: Histogram, amounts: np.ndarray) -> None:
    """`histogram.observe(a)` for every `a` of `amounts` (a labelled child), in one pass: the batch loop observes each
    request's queue wait, and a lock and a bucket search per request cost more than the rest of its bookkeeping.
    Written against prometheus-client's Histogram internals (`_upper_bounds`, `_buckets`, `_sum`): the version is
    pinned, and tests/test_metrics.py checks this against `observe`."""
    bucket_of = np.searchsorted(histogram._upper_bounds, amounts)  # the first bound >= amount, as observe finds it
    counts = np.bincount(bucket_of, minlength=len(histogram._upper_bounds))
    histogram._sum.inc(float(amounts.sum()))
    for bucket in np.flatnonzero(counts):
        histogram._buckets[bucket].inc(int(counts[bucket]))
