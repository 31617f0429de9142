"""Kubernetes manifests: valid against the Kubernetes schemas (offline), consistent with server and image."""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from server.app import SERVICE_NAME
from server.settings import ENV_PREFIX, Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest release with native gRPC probes (GA in 1.27) and the newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())


def manifest_files() -> list[Path]:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    return [MANIFESTS / name for name in kustomization["resources"]]


def documents(kind: str) -> list[dict]:
    found = [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text())
             if doc["kind"] == kind]
    assert found, f"no {kind} in the manifests"
    return found


def one(kind: str, name: str) -> dict:
    (document,) = [doc for doc in documents(kind) if doc["metadata"]["name"] == name]
    return document


def lstmserve_container() -> dict:
    (container,) = one("Deployment", "lstmserve")["spec"]["template"]["spec"]["containers"]
    return container


def settings_data() -> dict[str, str]:
    return one("ConfigMap", "lstmserve-settings")["data"]


def test_kustomization_lists_every_manifest():
    on_disk = [path for path in MANIFESTS.glob("*.yaml") if path.name != "kustomization.yaml"]
    assert sorted(manifest_files()) == sorted(on_disk)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path, version):
    problems = []
    for document in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:  # its text dumps the whole schema
            where = "/".join(map(str, error.absolute_path))
            problems.append(f"{document['kind']} {document['metadata']['name']}: {where}: {error.message}")
    assert not problems


def test_settings_are_real_settings_with_valid_values():
    data = settings_data()
    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__}
    assert set(data) <= known
    settings = Settings.from_args([], environ=data)  # the server's own parsing and bounds checks
    assert settings.host == "0.0.0.0" and settings.metrics_host == "0.0.0.0"


def test_probes_and_ports_follow_the_settings():
    settings = Settings.from_args([], environ=settings_data())
    container = lstmserve_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    annotations = one("Deployment", "lstmserve")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)


def test_termination_grace_covers_pre_stop_and_drain():
    settings = Settings.from_args([], environ=settings_data())
    pod = one("Deployment", "lstmserve")["spec"]["template"]["spec"]
    command = lstmserve_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(command[1]) + settings.shutdown_grace + 5


def test_pods_run_as_the_images_user():
    uid = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    pod = one("Deployment", "lstmserve")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_selectors_reach_the_server_pods():
    labels = one("Deployment", "lstmserve")["spec"]["template"]["metadata"]["labels"]
    selectors = [service["spec"]["selector"] for service in documents("Service")
                 if service["metadata"]["name"].startswith("lstmserve")]
    selectors.append(one("PodDisruptionBudget", "lstmserve")["spec"]["selector"]["matchLabels"])
    assert len(selectors) == 3 and all(selector.items() <= labels.items() for selector in selectors)
    target = one("HorizontalPodAutoscaler", "lstmserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "lstmserve")


def test_state_store_points_at_the_redis_service():
    store = urlparse(settings_data()["LSTMSERVE_STATE_STORE"])
    redis = one("Service", "redis")
    assert store.scheme == "redis" and store.hostname == redis["metadata"]["name"]
    assert store.port in [port["port"] for port in redis["spec"]["ports"]]
    assert redis["spec"]["selector"].items() <= one("StatefulSet", "redis")["spec"]["template"]["metadata"][
        "labels"].items()


def pod_volume(name: str) -> dict:
    (volume,) = [v for v in one("Deployment", "lstmserve")["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return volume


def test_the_server_reads_the_repository_its_settings_name_from_the_shared_volume():
    settings = Settings.from_args([], environ=settings_data())
    (mount,) = [m for m in lstmserve_container()["volumeMounts"] if m["mountPath"] == settings.model_repository]
    assert mount["readOnly"] is True
    claim = pod_volume(mount["name"])["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in one("PersistentVolumeClaim", claim)["spec"]["accessModes"]
    assert settings.poll_repository > 0  # every replica picks up a version added to the volume


def test_the_init_container_seeds_the_same_volume_with_the_servers_image():
    pod = one("Deployment", "lstmserve")["spec"]["template"]["spec"]
    (seed,) = pod["initContainers"]
    server_mounts = {m["name"]: m["mountPath"] for m in lstmserve_container()["volumeMounts"]}
    (mount,) = [m for m in seed["volumeMounts"] if m["name"] in server_mounts and m["mountPath"] != "/tmp"]
    assert mount["mountPath"] == server_mounts[mount["name"]] and not mount.get("readOnly")
    assert seed["image"] == lstmserve_container()["image"]
    assert seed["securityContext"] == lstmserve_container()["securityContext"]


@pytest.mark.slow
def test_the_init_containers_command_seeds_an_empty_repository_once_and_leaves_a_used_one_alone(tmp_path):
    """The init container's shell command, run here on a directory in place of the volume."""
    (seed,) = one("Deployment", "lstmserve")["spec"]["template"]["spec"]["initContainers"]
    mount = Settings.from_args([], environ=settings_data()).model_repository
    environ = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}

    def run_seed(repository: Path) -> None:
        command = [part.replace(mount, str(repository)) for part in seed["command"]]
        subprocess.run(command, env=environ, check=True, capture_output=True, timeout=120)

    empty, used = tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    run_seed(empty)
    assert sorted(str(p.relative_to(empty)) for p in empty.rglob("*")) == [
        "tutorial-lstm", "tutorial-lstm/1", "tutorial-lstm/1/model.pt"]
    written = (empty / "tutorial-lstm" / "1" / "model.pt").stat().st_mtime_ns
    run_seed(empty)
    assert (empty / "tutorial-lstm" / "1" / "model.pt").stat().st_mtime_ns == written
    (used / "mine" / "3").mkdir(parents=True)
    (used / "mine" / "3" / "model.pt").write_bytes(b"the operator's model")
    run_seed(used)
    assert not (used / "tutorial-lstm").exists()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_roll_out_job_validates_and_writes_the_servers_repository(version):
    (job,) = yaml.safe_load_all((MANIFESTS / "jobs" / "add-demo-version.yaml").read_text())
    kubernetes_validate.validate(job, version, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (name, claim), = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}.items()
    repository = Settings.from_args([], environ=settings_data()).model_repository
    assert mounts[name] == repository and claim == pod_volume("models")["persistentVolumeClaim"]["claimName"]
    assert container["command"][container["command"].index("--repository") + 1] == repository
    assert pod["securityContext"]["runAsUser"] == one("Deployment", "lstmserve")["spec"]["template"]["spec"][
        "securityContext"]["runAsUser"]
