"""The targets of issue 3 (and of the later issues' scenarios) that a run measured: each one's ratio, bound and
whether it is met."""

from bench.harness import BATCH_OFF, ECHO, IN_PROCESS, SERVER
from bench.tables import _ratio


def targets(results: dict) -> list[dict]:
    """Every target of issue 3 that this run measured, with its ratio and whether it is met."""
    found = []

    def add(name: str, ratio: float, bound: float, at_least: bool) -> None:
        met = ratio >= bound if at_least else ratio <= bound
        found.append(
            {
                "target": name,
                "ratio": ratio,
                "bound": f"{'>=' if at_least else '<='} {bound}",
                "met": bool(met),
            }
        )

    for row in results.get("closed", []):
        if row["sessions"] != 256:
            continue
        c = row["configs"]
        limit = min(c[ECHO]["throughput"], c[IN_PROCESS]["throughput"])
        add(
            f"closed {row['model']} @256: server / min(echo, in-process)",
            _ratio(c[SERVER]["throughput"], limit),
            0.8,
            True,
        )
        add(
            f"closed {row['model']} @256: server p99 / echo p99",
            _ratio(c[SERVER]["p99"], c[ECHO]["p99"]),
            1.5,
            False,
        )
        if BATCH_OFF in c and row["model"] == "large":
            add(
                "closed large @256: batching on / off",
                _ratio(c[SERVER]["throughput"], c[BATCH_OFF]["throughput"]),
                10,
                True,
            )
    multiplexed = results.get("multiplexed", [])
    pingpong = [r for r in multiplexed if r["config"] == "echo ping-pong"]
    served = [r for r in multiplexed if r["config"] == SERVER]
    if pingpong and served:
        best = max(served, key=lambda r: r["throughput"])
        add(
            f"multiplexed {best['model']} @{best['sessions']} (StreamBatch x{best['streams']})"
            " / echo ping-pong",
            _ratio(best["throughput"], pingpong[0]["throughput"]),
            5,
            True,
        )
    _columnar_targets(results, add)
    for row in results.get("predict", []):
        if (row["seq_len"], row["batch"]) == (1000, 64):
            add(
                f"Predict {row['model']} seq_len 1000 batch 64: server / in-process",
                _ratio(row["inprocess_seconds"], row["server_seconds"]),
                0.9,
                True,
            )
    for row in results.get("memory", []):
        allowed = 1.25 * row["raw_state_bytes"] + 1024
        add(
            f"memory {row['model']} @{row['sessions']}: bytes per idle session / (1.25 x raw + 1 KiB)",
            _ratio(row["bytes_per_session"], allowed),
            1.0,
            False,
        )
    for row in results.get("rollout", []):
        at = f"rollout {row['model']} @{row['sessions']}"
        add(f"{at}: p99 around the switch / steady", _ratio(row["configs"]["switch"]["p99"],
                                                            row["configs"]["steady"]["p99"]), 2, False)
        add(f"{at}: steps lost (errors + unanswered)", row["lost"], 0, False)
        add(f"{at}: RSS after the unload / before the load", row["rss_ratio"], 1.1, False)
    return found


def _columnar_targets(results: dict, add) -> None:
    for row in results.get("columnar", []):
        if row["sessions"] == 1024:
            add(f"columnar {row['model']} @1024: server StreamColumns / echo StreamBatch",
                row["server_over_echo_batch"], 0.6, True)
