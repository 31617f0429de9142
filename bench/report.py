"""The markdown tables of issue 3's scenarios (closed and open loop, multiplexed, Predict, memory) followed by every
target's verdict, and the run's JSON."""

import json
from pathlib import Path

from bench.harness import BATCH_OFF, ECHO, IN_PROCESS, SERVER
from bench.tables import _ms, _n, _ratio, _table
from bench.targets import targets


def markdown(results: dict) -> str:
    parts = []
    if results.get("closed"):
        rows = []
        for row in results["closed"]:
            c = row["configs"]
            limit = min(c[ECHO]["throughput"], c[IN_PROCESS]["throughput"])
            off = c.get(BATCH_OFF, {})
            rows.append(
                [
                    row["model"],
                    row["sessions"],
                    _n(c[SERVER]["throughput"]),
                    _n(c[ECHO]["throughput"]),
                    f"{_n(c[IN_PROCESS]['throughput'])} (b={c[IN_PROCESS]['batch']})",
                    _n(off.get("throughput")),
                    _n(_ratio(c[SERVER]["throughput"], limit), 2),
                    _ms(c[SERVER]["p99"]),
                    _ms(c[ECHO]["p99"]),
                    _n(_ratio(c[SERVER]["p99"], c[ECHO]["p99"]), 2),
                    _n(_ratio(c[SERVER]["throughput"], off["throughput"]), 1) if off else "-",
                ]
            )
        parts.append(
            "### Streaming, closed loop (steps/s; p99 in ms)\n\n"
            + _table(
                [
                    "model",
                    "sessions",
                    "server",
                    "echo",
                    "in-process (formed batch)",
                    "batching off",
                    "server / min(limits)",
                    "p99 server",
                    "p99 echo",
                    "p99 ratio",
                    "on / off",
                ],
                rows,
            )
        )
    if results.get("open"):
        rows = [
            [
                r["model"],
                r["sessions"],
                f"{r['load']:.0%} ({_n(r['rate'])}/s)",
                config,
                _n(f["throughput"]),
                _ms(f["p50"]),
                _ms(f["p99"]),
                _ms(f["p999"]),
                f["dropped"],
            ]
            for r in results["open"]
            for config, f in r["configs"].items()
        ]
        parts.append(
            "### Streaming, open loop (latency from the intended send time, ms)\n\n"
            + _table(
                [
                    "model",
                    "sessions",
                    "offered",
                    "config",
                    "achieved steps/s",
                    "p50",
                    "p99",
                    "p99.9",
                    "unanswered",
                ],
                rows,
            )
        )
    if results.get("multiplexed"):
        rows = [
            [
                r["model"],
                r["sessions"],
                r["config"],
                r["streams"] or "one per session",
                _n(r["throughput"]),
                _ms(r["p99"]),
            ]
            for r in results["multiplexed"]
        ]
        parts.append(
            "### Multiplexed (StreamBatch: many sessions' steps per message)\n\n"
            + _table(["model", "sessions", "config", "streams", "steps/s", "p99 per message"], rows)
        )
    if results.get("predict"):
        rows = [
            [
                r["model"],
                r["seq_len"],
                r["batch"],
                _ms(r["server_seconds"]),
                _ms(r["inprocess_seconds"]),
                _n(_ratio(r["inprocess_seconds"], r["server_seconds"]), 2),
            ]
            for r in results["predict"]
        ]
        parts.append(
            "### Predict (whole sequences; ms per call)\n\n"
            + _table(["model", "seq_len", "batch", "over gRPC", "in-process", "in-process / gRPC time"], rows)
        )
    if results.get("memory"):
        rows = [
            [
                r["model"],
                r["sessions"],
                _n(r["rss_growth_bytes"] / 2**20, 1),
                _n(r["bytes_per_session"]),
                r["raw_state_bytes"],
                _n(1.25 * r["raw_state_bytes"] + 1024),
            ]
            for r in results["memory"]
        ]
        parts.append(
            "### Memory per idle session\n\n"
            + _table(
                ["model", "sessions", "RSS growth (MiB)", "bytes / session", "raw state", "target bound"],
                rows,
            )
        )
    found = targets(results)
    if found:
        rows = [[t["target"], _n(t["ratio"], 2), t["bound"], "met" if t["met"] else "NOT met"] for t in found]
        parts.append("### Targets\n\n" + _table(["target", "ratio", "bound", ""], rows))
    return "\n\n".join(parts) + "\n"


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps({**results, "targets": targets(results)}, indent=1, default=float))
