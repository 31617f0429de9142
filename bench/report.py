"""Turns a bench run's results into the targets' ratios, markdown tables, JSON and a plot."""

import json
import math
from pathlib import Path

from bench.scenarios import BATCH_OFF, ECHO, IN_PROCESS, SERVER


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


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


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _n(value: float, digits: int = 0) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else _n(seconds * 1e3, 2)


def configs_table(rows: list[dict], modes: tuple[str, ...], mode_header: str) -> str:
    """One line per (model, sessions, mode) of a scenario that compares server configurations: throughput and
    p99, each as a ratio against the first mode's, measured in the same run. Empty when nothing was run."""
    lines = []
    for row in rows:
        base = row["configs"][modes[0]]
        for mode in modes:
            figures = row["configs"][mode]
            lines.append([row["model"], row["sessions"], mode, _n(figures["throughput"]), _ms(figures["p99"]),
                          _n(_ratio(figures["throughput"], base["throughput"]), 2),
                          _n(_ratio(figures["p99"], base["p99"]), 2)])
    if not lines:
        return ""
    return _table(["model", "sessions", mode_header, "steps/s", "p99", "steps/s ratio", "p99 ratio"], lines)


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


def plot(results: dict, path: Path) -> bool:
    """Throughput and p99 against concurrency, one panel per model (and one for the columnar scenario) and one line
    per configuration."""
    closed, columnar = results.get("closed", []), results.get("columnar", [])
    if not closed and not columnar:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in closed))
    panels = len(models) + bool(columnar)
    figure, axes = plt.subplots(2, panels, figsize=(4 * panels, 7), squeeze=False)
    for column, model in enumerate(models):
        rows = [r for r in closed if r["model"] == model]
        for config in (SERVER, ECHO, BATCH_OFF, IN_PROCESS):
            points = [(r["sessions"], r["configs"][config]) for r in rows if config in r["configs"]]
            if not points:
                continue
            sessions = [p[0] for p in points]
            axes[0][column].plot(sessions, [p[1]["throughput"] for p in points], marker="o", label=config)
            if config != IN_PROCESS:
                axes[1][column].plot(sessions, [p[1]["p99"] * 1e3 for p in points], marker="o", label=config)
        axes[0][column].set_title(f"{model}: throughput")
        axes[1][column].set_title(f"{model}: p99 latency")
        axes[0][column].set_ylabel("steps/s")
        axes[1][column].set_ylabel("ms")
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("concurrent sessions (closed loop)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
    if columnar:
        _plot_columnar(axes[0][-1], axes[1][-1], columnar)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def _plot_columnar(throughput, latency, rows: list[dict]) -> None:
    """The columnar scenario's configurations against the sessions in one message."""
    for config in dict.fromkeys(config for row in rows for config in row["configs"]):
        points = [(r["sessions"], r["configs"][config]) for r in rows if config in r["configs"]]
        throughput.plot([p[0] for p in points], [p[1]["throughput"] for p in points], marker="o", label=config)
        if config != IN_PROCESS:
            latency.plot([p[0] for p in points], [p[1]["p99"] * 1e3 for p in points], marker="o", label=config)
    throughput.set_title(f"{rows[0]['model']} columnar: throughput")
    latency.set_title(f"{rows[0]['model']} columnar: p99 per message")
    throughput.set_ylabel("steps/s")
    latency.set_ylabel("ms")
    for axis in (throughput, latency):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sessions in one message")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
