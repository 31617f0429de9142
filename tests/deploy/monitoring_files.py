"""The shipped deploy/monitoring/ files as the tests read them, and the shipped Prometheus configuration made to
run on this machine."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"][0]["rules"]
    assert all({"alert", "expr", "labels", "annotations"} <= rule.keys() for rule in rules)
    return rules


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_targets() -> dict[str, str]:
    """Each panel query's expression by `panel title/refId`."""
    return {f"{panel['title']}/{target['refId']}": target["expr"]
            for panel in dashboard()["panels"] for target in panel["targets"]}


def dashboard_variable_queries() -> dict[str, str]:
    """Each query variable's definition (Grafana's `label_values(...)`, not PromQL) by variable name."""
    return {variable["name"]: variable["definition"] for variable in dashboard()["templating"]["list"]
            if "definition" in variable}


def kubernetes_pod_targets(workload: str, namespace: str, pod: str, ip: str,
                           moved_ports: dict[int, int] | None = None) -> list[dict]:
    """The targets Kubernetes pod discovery makes of a pod of `workload` (its manifest in deploy/kubernetes/), as
    file_sd target groups: one per container port, with the `__meta_kubernetes_*` labels the shipped relabelling
    reads. `moved_ports` renumbers manifest ports, the port annotation too (on loopback a pod cannot have them).
    """
    moved_ports = moved_ports or {}
    (manifest,) = [document for path in (ROOT / "deploy" / "kubernetes").glob("*.yaml")
                   for document in yaml.safe_load_all(path.read_text())
                   if document["kind"] in ("Deployment", "StatefulSet") and document["metadata"]["name"] == workload]
    template = manifest["spec"]["template"]
    labels = template["metadata"].get("labels", {})
    annotations = dict(template["metadata"].get("annotations", {}))
    if "prometheus.io/port" in annotations:
        port = int(annotations["prometheus.io/port"])
        annotations["prometheus.io/port"] = str(moved_ports.get(port, port))
    meta = {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_ready": "true"}
    for kind, values in (("label", labels), ("annotation", annotations)):
        for name, value in values.items():
            meta[f"__meta_kubernetes_pod_{kind}_{_label_name(name)}"] = value
            meta[f"__meta_kubernetes_pod_{kind}present_{_label_name(name)}"] = "true"
    groups = []
    for container in template["spec"]["containers"]:
        for port in container.get("ports", []):
            number = moved_ports.get(port["containerPort"], port["containerPort"])
            groups.append({"targets": [f"{ip}:{number}"], "labels": {
                **meta, "__meta_kubernetes_pod_container_name": container["name"],
                "__meta_kubernetes_pod_container_image": container["image"],
                "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                "__meta_kubernetes_pod_container_port_number": str(number),
                "__meta_kubernetes_pod_container_port_protocol": port.get("protocol", "TCP")}})
    return groups


def _label_name(name: str) -> str:
    """A Kubernetes label or annotation name as Prometheus's meta label names it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def loopback_config(directory: Path, target_groups: list[dict]) -> Path:
    """The shipped prometheus.yml made to run here, written into `directory`, with `target_groups` as what
    Kubernetes would discover.

    Debian's Prometheus is built without Kubernetes discovery, so only that changes: the pods come from a file
    (file_sd) carrying the same meta labels. The job, its relabelling and the rules are the shipped ones;
    intervals are 1 s so a test sees scrapes and rule evaluations within seconds; rule files are found by path.
    """
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    pods = directory / "pods.json"
    pods.write_text(json.dumps(target_groups))
    job["file_sd_configs"] = [{"files": [str(pods)]}]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / name) for name in config["rule_files"]]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
