"""The memory scenario of issue 3: the server's RSS growth per idle session, against the raw state's size."""

import time

from bench.harness import Bench
from bench.plan import MODELS

CREATE_PER_MESSAGE = 1000


def run(bench: Bench) -> None:
    """Idle sessions created in StreamBatch messages, up to each count; the RSS growth per session."""
    name = bench.plan.memory_model
    input_size, hidden, layers = MODELS[name]
    ceiling = max(bench.plan.memory_sessions)
    with bench.server(
        name,
        "-memory",
        max_sessions=ceiling,
        idle_timeout=3600,
        max_queued_requests=max(100_000, CREATE_PER_MESSAGE),
    ) as on:
        time.sleep(0.5)
        baseline, created = on.rss_bytes(), 0
        for target in bench.plan.memory_sessions:
            bench.pool.run(
                [
                    dict(
                        kind="create",
                        address=on.address,
                        sessions=target - created,
                        per_message=min(CREATE_PER_MESSAGE, target - created),
                        input_size=input_size,
                    )
                ]
            )
            created = target
            live = int(on.metric("lstmserve_live_sessions"))
            grown = on.rss_bytes() - baseline
            bench.results["memory"].append(
                {
                    "model": name,
                    "sessions": created,
                    "live_sessions": live,
                    "rss_growth_bytes": grown,
                    "bytes_per_session": grown / created,
                    "raw_state_bytes": 2 * layers * hidden * 4,
                }
            )
            bench.progress(
                f"memory {name} {created} sessions: {grown / created:.0f} bytes each "
                f"(raw state {2 * layers * hidden * 4})"
            )
