"""A real Prometheus, run with the shipped scrape job and alert rules, scrapes a real lstmserve under a short load;
every dashboard query and every alert expression goes through Prometheus's query API."""

import math
import re
import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import LstmClient, messages
from tests.deploy.monitoring_files import (
    alert_rules,
    dashboard_targets,
    dashboard_variable_queries,
    kubernetes_pod_targets,
    loopback_config,
)
from tests.prometheus_server import prometheus_server
from tests.servers import server_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMESPACE, POD = "lstmserve-test", "lstmserve-test-0"
# Grafana's own variable; any window holding the short load's scrapes does.
RATE_INTERVAL = "1m"
# Conditions the short healthy load never creates, whatever the machine's speed (latency and queue wait depend
# on it, so their alerts are left out).
QUIET_UNDER_HEALTHY_LOAD = ("LstmserveDown", "LstmserveHighErrorRatio", "LstmserveModelFailures",
                            "LstmserveSessionEvictions", "LstmserveStateStoreErrors",
                            "LstmserveModelVersionUnavailable", "LstmserveModelNotReady")


def one_round_of_load(client: LstmClient) -> None:
    """Every kind of call a dashboard panel shows, and bad requests a client caused."""
    with client.session() as session:
        session.step(np.ones(4))
        for _ in session.stream([np.ones(4)] * 3):
            pass
    client.predict(np.ones((3, 1, 4)))
    for bad_call in (lambda: client.predict(np.ones((3, 1, 5))),  # INVALID_ARGUMENT: 5 inputs, the model takes 4
                     lambda: client.stub.Step(messages.step_request("no-such-session", 1, np.ones(4))[0])):
        with pytest.raises(grpc.RpcError):
            bad_call()


@pytest.fixture(scope="module")
def scraped(demo_model, tmp_path_factory):
    """(Prometheus, the running server, a time at which the load is in Prometheus) once the target has been
    scraped three times under load and every rule has been evaluated."""
    directory = tmp_path_factory.mktemp("prometheus")
    with server_in_thread(demo_model) as server, LstmClient(server.address, timeout=30) as client:
        pods = (kubernetes_pod_targets("lstmserve", NAMESPACE, POD, "127.0.0.1",
                                       {50051: server.app.port, 9090: server.app.metrics_port})
                + kubernetes_pod_targets("redis", NAMESPACE, "redis-0", "127.0.0.1"))
        with prometheus_server(loopback_config(directory, pods), directory) as prometheus:
            def seen_under_load() -> float | None:
                """A time by which scrapes saw the steps counter move twice, the last scrape succeeding. Every
                scrape begun by then has ended (they time out after 1 s): no late sample changes what queries at
                that time find."""
                one_round_of_load(client)
                settled = time.time() - 2
                seen = prometheus.query(
                    "changes(lstmserve_steps_applied_total[1m]) >= 2 and ignoring (model, version) up == 1", settled)
                return settled if seen else None

            loaded_at = prometheus.wait_for(seen_under_load, "three scrapes under load", timeout=60)
            prometheus.wait_for(lambda: all(rule["health"] != "unknown" for rule in rules(prometheus)),
                                "every rule evaluated")
            yield prometheus, server, loaded_at


def rules(prometheus) -> list[dict]:
    return [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]


def grafana_to_promql(expression: str) -> str:
    """A dashboard expression as Grafana sends it: its variables substituted, `label_values()` made a query."""
    expression = re.sub(r"^label_values\((.+),\s*(\w+)\)$", r"group by (\2) (\1)", expression)
    expression = expression.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", NAMESPACE)
    expression = expression.replace("$model", ".*")  # the variable's "All"
    assert "$" not in expression, f"a Grafana variable the test does not know: {expression}"
    return expression


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def threshold_operand(expression: str) -> str:
    """What an alert compares with its threshold: `up == 0` -> `up`."""
    match = re.fullmatch(r"(.*\S)\s*(?:>|<|==|!=|>=|<=)\s*[\d.]+\s*", expression, re.S)
    assert match, f"no threshold at the end of {expression!r}"
    return match.group(1)


def test_the_shipped_relabelling_scrapes_the_annotated_port_once_per_pod(scraped):
    prometheus, server, loaded_at = scraped
    targets = prometheus.api("targets")
    (target,) = targets["activeTargets"]  # the pod's two container ports relabelled to the one annotated port
    address = f"127.0.0.1:{server.app.metrics_port}"
    assert target["scrapeUrl"] == f"http://{address}/metrics"
    (up,) = prometheus.query('up{job="lstmserve"}', loaded_at)
    assert up["metric"] == {"__name__": "up", "job": "lstmserve", "instance": address, "namespace": NAMESPACE,
                            "pod": POD}
    assert up["value"][1] == "1"
    dropped = {t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in targets["droppedTargets"]}
    assert dropped == {"redis-0"}  # not labelled app.kubernetes.io/name=lstmserve nor annotated


def test_every_dashboard_panel_shows_data_after_a_short_load(scraped):
    prometheus, _, loaded_at = scraped
    empty = {panel: expression for panel, expression in dashboard_targets().items()
             if not has_data(prometheus.query(grafana_to_promql(expression), loaded_at))}
    assert empty == {}


def test_the_namespace_variable_lists_the_scraped_namespace(scraped):
    prometheus, _, loaded_at = scraped
    query = grafana_to_promql(dashboard_variable_queries()["namespace"])
    assert [sample["metric"] for sample in prometheus.query(query, loaded_at)] == [{"namespace": NAMESPACE}]


def test_the_model_variable_lists_the_served_model(scraped):
    prometheus, server, loaded_at = scraped
    query = grafana_to_promql(dashboard_variable_queries()["model"])
    served = server.app.engine.describe().metadata.name
    assert [sample["metric"] for sample in prometheus.query(query, loaded_at)] == [{"model": served}]


def test_every_alert_expression_evaluates_and_what_it_measures_has_data(scraped):
    prometheus, _, loaded_at = scraped
    no_data = set()
    for rule in alert_rules():
        firing = prometheus.query(rule["expr"], loaded_at)
        if rule["alert"] in QUIET_UNDER_HEALTHY_LOAD:
            assert firing == [], rule["alert"]
        # Without a server-side error the error ratio's numerator has no series, so neither has the ratio.
        if rule["alert"] != "LstmserveHighErrorRatio" and not has_data(
                prometheus.query(threshold_operand(rule["expr"]), loaded_at)):
            no_data.add(rule["alert"])
    assert no_data == set()


def test_prometheus_evaluates_every_shipped_rule_without_error(scraped):
    prometheus, _, _ = scraped
    health = {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in rules(prometheus)}
    assert health == {rule["alert"]: ("ok", "") for rule in alert_rules()}


def test_latency_queries_leave_out_every_streaming_method_the_server_serves(scraped):
    """A stream's latency is its lifetime: a latency quantile over one would mean nothing (and page someone)."""
    _, server, _ = scraped
    streaming, unary = set(), set()
    for service in served_services(server.address):
        for method in descriptor_pool.Default().FindServiceByName(service).methods:
            is_stream = method.client_streaming or method.server_streaming
            (streaming if is_stream else unary).add(f"/{service}/{method.name}")
    excluded = [re.compile(pattern) for pattern in re.findall(
        r'method!~"([^"]+)"', " ".join([*dashboard_targets().values(), *(r["expr"] for r in alert_rules())]))]
    assert excluded
    for pattern in excluded:  # PromQL regular expressions are anchored at both ends
        assert {method for method in streaming if not pattern.fullmatch(method)} == set()
        assert {method for method in unary if pattern.fullmatch(method)} == set()


def served_services(address: str) -> list[str]:
    """The services a running server lists through gRPC reflection."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    return [service.name for service in response.list_services_response.service]
