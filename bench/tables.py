"""Markdown cells and tables shared by the bench's reports: ratios, numbers, milliseconds, and the table that
compares server configurations measured in the same run."""

import math


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


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
