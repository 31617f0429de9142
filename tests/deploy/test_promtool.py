"""The shipped Prometheus configuration and alert rules, checked by Prometheus's own promtool, and the alerts'
unit tests (deploy/monitoring/tests/) run by it."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.monitoring_files import MONITORING, RULE_TESTS, alert_rules, kubernetes_pod_targets, loopback_config

pytestmark = pytest.mark.unit


def promtool(*args: str | Path) -> str:
    executable = shutil.which("promtool")
    assert executable, "promtool is not installed; `make test` installs Debian's prometheus package with apt-get"
    result = subprocess.run([executable, *map(str, args)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_the_scrape_configuration_and_the_rules_it_loads_check_clean(tmp_path):
    pods = kubernetes_pod_targets("lstmserve", "lstmserve", "lstmserve-0", "10.0.0.1")
    output = promtool("check", "config", loopback_config(tmp_path, pods))
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_the_alert_rules_check_clean():
    assert f"SUCCESS: {len(alert_rules())} rules found" in promtool("check", "rules", MONITORING / "alerts.yml")


def test_the_alert_unit_tests_pass():
    assert RULE_TESTS
    assert "SUCCESS" in promtool("test", "rules", *RULE_TESTS)


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_stays_silent():
    groups = [group for path in RULE_TESTS for group in yaml.safe_load(path.read_text())["tests"]]
    fires = {test["alertname"] for group in groups for test in group["alert_rule_test"] if test["exp_alerts"]}
    silent = {test["alertname"] for group in groups
              if not any(test["exp_alerts"] for test in group["alert_rule_test"])
              for test in group["alert_rule_test"]}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fires == set()
    assert alerts - silent == set()
