"""Every metric the alert rules and the Grafana dashboard query is one the server really exports."""

import re
import urllib.request

import pytest

from tests.deploy.monitoring_files import alert_rules, dashboard_targets, dashboard_variable_queries
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def dashboard_queries() -> list[str]:
    return [*dashboard_targets().values(), *dashboard_variable_queries().values()]


def metric_names(queries: list[str]) -> set[str]:
    return {name for query in queries for name in re.findall(r"\blstmserve_[a-z_]+", query)}


@pytest.fixture(scope="module")
def exported(demo_model) -> dict[str, str]:
    """Metric name -> type from the `# TYPE` lines of a real server's /metrics page.

    prometheus_client adds a `*_created` timestamp gauge beside each counter and histogram; not worth a panel.
    """
    with server_in_thread(demo_model) as server:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    types = dict(re.findall(r"^# TYPE (lstmserve_\w+) (\w+)$", text, re.M))
    return {name: kind for name, kind in types.items() if not name.endswith("_created")}


def unknown(names: set[str], exported: dict[str, str]) -> set[str]:
    def known(name: str) -> bool:
        base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        return name in exported or exported.get(base) == "histogram"
    return {name for name in names if not known(name)}


def test_the_server_exports_the_core_metrics(exported):
    assert exported["lstmserve_rpcs_total"] == "counter"
    assert exported["lstmserve_rpc_latency_seconds"] == "histogram"


def test_alert_rules_query_only_exported_metrics(exported):
    names = metric_names([rule["expr"] for rule in alert_rules()])
    assert unknown(names, exported) == set()


def test_dashboard_queries_only_exported_metrics(exported):
    assert unknown(metric_names(dashboard_queries()), exported) == set()


def test_dashboard_shows_every_exported_metric(exported):
    used = {name.removesuffix(s) for name in metric_names(dashboard_queries()) for s in HISTOGRAM_SUFFIXES
            if name.endswith(s)} | metric_names(dashboard_queries())
    assert set(exported) - used == set()


def test_alerts_cover_errors_latency_evictions_and_the_state_store():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "lstmserve_rpcs_total" in exprs["LstmserveHighErrorRatio"]
    assert "histogram_quantile(0.99" in exprs["LstmserveHighP99Latency"]
    assert "lstmserve_sessions_evicted_total" in exprs["LstmserveSessionEvictions"]
    assert "lstmserve_state_store_errors_total" in exprs["LstmserveStateStoreErrors"]

