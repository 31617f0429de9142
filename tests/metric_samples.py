"""Reading the server's metrics in tests, whatever labels a series carries."""

from prometheus_client import CollectorRegistry


def total(registry: CollectorRegistry, name: str) -> float:
    """The sum of a metric's samples over every label set (the per-model series carry model and version)."""
    return sum(sample.value for metric in registry.collect() for sample in metric.samples if sample.name == name)
