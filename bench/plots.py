"""The bench's plot: throughput and p99 against concurrency, one panel per model and one for the columnar
scenario."""

from pathlib import Path

from bench.harness import BATCH_OFF, ECHO, IN_PROCESS, SERVER


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
