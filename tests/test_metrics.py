"""Per-model series: labelled by model and version while that version is loaded, gone once it is unloaded."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.metrics import Metrics, observe_all

pytestmark = pytest.mark.unit

STATES = ("LOADING", "READY", "DRAINING", "UNAVAILABLE")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def labelled(metrics: Metrics, name: str) -> dict[tuple[str, str], float]:
    return {(s.labels["model"], s.labels["version"]): s.value for m in metrics.registry.collect()
            for s in m.samples if s.name == name}


def test_each_version_records_under_its_own_labels(metrics):
    one, two = metrics.for_model("tutorial-lstm", "1"), metrics.for_model("tutorial-lstm", "2")
    one.steps_applied.inc(5)
    two.steps_applied.inc(2)
    one.batch_size.observe(4)
    one.compute_time.observe(0.5)
    two.live_sessions.set_function(lambda: 3)
    assert labelled(metrics, "lstmserve_steps_applied_total") == {("tutorial-lstm", "1"): 5,
                                                                  ("tutorial-lstm", "2"): 2}
    assert labelled(metrics, "lstmserve_live_sessions")[("tutorial-lstm", "2")] == 3
    assert metrics.model_totals("tutorial-lstm", "1") == (1, 5, 0.5)
    assert metrics.model_totals("tutorial-lstm", "2") == (0, 2, 0.0)


def test_an_unloaded_version_leaves_no_series_behind(metrics):
    one, two = metrics.for_model("m", "1"), metrics.for_model("m", "2")
    one.sessions_created.inc()
    two.sessions_created.inc()
    one.forget()
    one.forget()  # unloading twice is harmless
    text = generate_latest(metrics.registry).decode()
    assert 'version="1"' not in text and 'version="2"' in text
    assert metrics.model_totals("m", "1") == (0, 0, 0.0)


def test_refusals_and_evictions_stay_server_wide(metrics):
    view = metrics.for_model("m", "1")
    view.limit_refusals.labels("max_sessions").inc()
    view.sessions_evicted.labels("max_sessions").inc()
    assert metrics.registry.get_sample_value("lstmserve_limit_refusals_total", {"limit": "max_sessions"}) == 1
    assert metrics.registry.get_sample_value("lstmserve_sessions_evicted_total", {"limit": "max_sessions"}) == 1


def test_model_versions_counts_each_state_of_each_model_at_scrape_time(metrics):
    versions = [("a", "READY"), ("a", "DRAINING"), ("a", "READY"), ("b", "UNAVAILABLE")]
    metrics.watch_versions(STATES, lambda: versions)

    def counts() -> dict[tuple[str, str], float]:
        return {(s.labels["model"], s.labels["state"]): s.value for m in metrics.registry.collect()
                for s in m.samples if s.name == "lstmserve_model_versions"}

    assert counts() == {("a", "LOADING"): 0, ("a", "READY"): 2, ("a", "DRAINING"): 1, ("a", "UNAVAILABLE"): 0,
                        ("b", "LOADING"): 0, ("b", "READY"): 0, ("b", "DRAINING"): 0, ("b", "UNAVAILABLE"): 1}
    versions[1] = ("a", "READY")  # the drained version's place taken: read again at the next scrape
    del versions[3]
    assert counts()[("a", "READY")] == 3 and ("b", "READY") not in counts()


def test_observe_all_records_what_observe_records_one_by_one():
    amounts = np.array([0.0, 0.0001, 0.00011, 0.003, 0.003, 0.7, 9.99, 10.0, 42.0, 1e9])  # bounds, between, past
    one_by_one, at_once = (Metrics(CollectorRegistry()) for _ in range(2))
    for amount in amounts:
        one_by_one.queue_wait.labels("m", "1").observe(amount)
    observe_all(at_once.queue_wait.labels("m", "1"), amounts)
    assert exposition(at_once) == exposition(one_by_one)
    assert 'lstmserve_queue_wait_seconds_bucket{le="0.0001",model="m",version="1"} 2.0' in exposition(at_once)


def exposition(metrics: Metrics) -> list[str]:
    """The scrape's lines but the series' creation times, which differ between two registries."""
    return [line for line in generate_latest(metrics.registry).decode().splitlines() if "_created" not in line]
