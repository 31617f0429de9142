"""Keeps the benchmark harness working: `bench --quick` on one tiny scenario. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def quick_bench(out: Path, scenarios: str, *options: str) -> tuple[dict, str]:
    """Runs `bench --quick` on the tiny model; returns its results.json and what it printed."""
    command = [sys.executable, "-m", "bench", "--quick", "--models", "tiny", "--scenarios", scenarios, *options,
               "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    return json.loads((out / "results.json").read_text()), finished.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_writes_results_table_and_plot(tmp_path):
    results, printed = quick_bench(tmp_path, "closed", "--concurrency", "16")
    assert {"machine", "plan", "closed", "targets"} <= results.keys()
    [row] = results["closed"]
    assert (row["model"], row["sessions"]) == ("tiny", 16)
    assert row["formed_batch"] >= 1
    assert {"server", "echo", "in-process"} <= row["configs"].keys()
    for config in ("server", "echo"):
        figures = row["configs"][config]
        assert figures["throughput"] > 0 and figures["samples"] > 0
        assert 0 < figures["p50"] <= figures["p99"] <= figures["p999"]
    assert row["configs"]["in-process"]["throughput"] > 0
    assert "| tiny | 16 |" in printed  # the table
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
@pytest.mark.slow
def test_quick_bench_runs_the_merged_predict_and_oip_scenarios(tmp_path):
    results, printed = quick_bench(tmp_path, "merged,oip")
    [merged] = results["merged"]
    assert merged["configs"]["merged"]["throughput"] > 0 and merged["configs"]["in-process"]["throughput"] > 0
    [oip] = results["oip"]
    assert set(oip["configs"]) == {"OIP ModelStreamInfer", "native Stream", "OIP ModelInfer", "native Step"}
    assert all(figures["throughput"] > 0 for figures in oip["configs"].values())
    assert "merged / unmerged steps/s" in printed and "OIP ModelInfer tiny @64 / native Step" in printed
    assert (tmp_path / "plot-callers.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
@pytest.mark.slow
def test_quick_rollout_bench_switches_versions_and_reports_its_windows(tmp_path):
    results, printed = quick_bench(tmp_path, "rollout")
    [row] = results["rollout"]
    assert (row["model"], row["sessions"]) == ("tiny", 64)
    for window in ("steady", "switch"):
        assert row["configs"][window]["throughput"] > 0 and row["configs"][window]["samples"] > 0
    assert row["lost"] == 0, row["errors"]
    assert 0 < row["ready_after"] < row["unloaded_after"]  # the old version went only after the new one served
    assert "### Roll-out" in printed and "rollout tiny @64: p99 around the switch / steady" in printed
