"""Every Prometheus metric the server exports, registered on a registry passed in."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The settings (`limit` label values) that make room by evicting under --full-policy evict, and all those a
# request can be refused for. Exported at 0 from the start: a counter's series that appears only at its first
# increment has no rate or increase for that increment, and no data in a dashboard before it.
EVICTING_LIMITS = ("max_sessions", "max_state_bytes", "max_sessions_per_owner")
REFUSING_LIMITS = (*EVICTING_LIMITS, "max_queued_requests", "rate_limit", "max_steps_per_request",
                   "max_sequence_length", "max_batch_size")


class Metrics:
    """Recorded in two places only: the RPC interceptor and the engine."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.rpcs = Counter("lstmserve_rpcs_total", "RPCs finished, by method and gRPC status code",
                            ["method", "code"], registry=registry)
        self.rpc_latency = Histogram("lstmserve_rpc_latency_seconds", "RPC duration (whole stream for streams)",
                                     ["method"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.live_sessions = Gauge("lstmserve_live_sessions", "Sessions currently open", registry=registry)
        self._live_counts: list[Callable[[], int]] = []  # one per engine (model version) loaded
        self.live_sessions.set_function(lambda: sum(count() for count in self._live_counts))
        self.sessions_created = Counter("lstmserve_sessions_created_total", "Sessions opened", registry=registry)
        self.sessions_closed = Counter("lstmserve_sessions_closed_total", "Sessions closed by their client",
                                       registry=registry)
        self.sessions_expired = Counter("lstmserve_sessions_expired_total", "Sessions expired after idling",
                                        registry=registry)
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
                                     registry=registry)
        self.batch_size = Histogram("lstmserve_batch_size", "Sessions per model call", buckets=_BATCH_BUCKETS,
                                    registry=registry)
        self.queue_wait = Histogram("lstmserve_queue_wait_seconds", "Time a request waited for its batch",
                                    buckets=_LATENCY_BUCKETS, registry=registry)
        self.compute_time = Histogram("lstmserve_model_compute_seconds", "Duration of one batched model call",
                                      buckets=_LATENCY_BUCKETS, registry=registry)
        self.state_store_errors = Counter("lstmserve_state_store_errors_total",
                                          "State store operations that failed (unreachable or timed out)",
                                          registry=registry)
        self.predict_merged = Counter("lstmserve_predict_merged_total",
                                      "Predict requests that shared their model call with others (merged on the "
                                      "batch axis)", registry=registry)
        self.model_failures = Counter("lstmserve_model_failures_total", "Model calls that raised",
                                      registry=registry)

    def count_live_sessions(self, count: Callable[[], int]) -> Callable[[], None]:
        """Adds an engine's live-session count to the gauge; returns what removes it (when the engine stops)."""
        self._live_counts.append(count)

        def uncount() -> None:
            if count in self._live_counts:  # an engine may be stopped twice (a failed start, then shutdown)
                self._live_counts.remove(count)
        return uncount

    def model_totals(self) -> tuple[int, int, float]:
        """Batched model calls, time steps applied to sessions and seconds spent in those calls, so far."""
        def value(name: str) -> float:
            return self.registry.get_sample_value(name) or 0.0

        return (int(value("lstmserve_batch_size_count")), int(value("lstmserve_steps_applied_total")),
                value("lstmserve_model_compute_seconds_sum"))
