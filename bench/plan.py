"""What a bench run measures: models, concurrencies, repeats and durations, full or quick."""

import dataclasses

# name -> (input, hidden, layers), as in issue 3; outputs are the hidden state (no head)
MODELS = {
    "tiny": (4, 3, 1),
    "small": (32, 128, 1),
    "medium": (64, 256, 2),
    "large": (128, 1024, 2),
}

SCENARIOS = ("closed", "open", "multiplexed", "columnar", "predict", "merged", "oip", "memory", "durability",
             "tracing", "rollout")


@dataclasses.dataclass(frozen=True)
class Plan:
    models: tuple[str, ...] = tuple(MODELS)
    scenarios: tuple[str, ...] = SCENARIOS
    concurrency: tuple[int, ...] = (1, 16, 256, 1024)
    # max_batch_size=1 at 1024 sessions of the large model takes ~10 s per round: 256 shows the point
    batch_off_concurrency: tuple[int, ...] = (1, 16, 256)
    repeats: int = 3
    warmup: float = 0.5  # seconds of load before the measuring window opens
    duration: float = 2.0  # seconds in the measuring window
    clients: int = 1  # client processes; on 2 cores a second one only takes CPU from the server
    torch_threads: int = 1  # the server's default; the in-process baseline uses the same
    device: str = "cpu"  # the servers' and the in-process baseline's torch device
    open_model: str = "small"
    open_sessions: int = 256
    open_load: tuple[float, ...] = (0.5, 0.9)  # fractions of the closed-loop maximum
    multiplexed_model: str = "small"
    multiplexed_sessions: int = 1024
    multiplexed_streams: tuple[int, ...] = (1, 4)
    columnar_model: str = "small"
    columnar_sessions: tuple[int, ...] = (1024, 8192)
    predict_model: str = "small"
    predict_shapes: tuple[tuple[int, int], ...] = (
        (100, 1),
        (100, 64),
        (1000, 1),
        (1000, 64),
    )  # (seq_len, batch)
    predict_calls: int = 5
    merged_model: str = "small"
    merged_shape: tuple[int, int] = (100, 1)  # (seq_len, batch) of each concurrent Predict
    merged_callers: int = 8
    oip_model: str = "small"
    oip_sequences: int = 64
    memory_model: str = "medium"
    memory_sessions: tuple[int, ...] = (10_000, 100_000)
    durability_model: str = "small"
    durability_sessions: tuple[int, ...] = (16, 256)
    tracing_model: str = "small"
    tracing_sessions: tuple[int, ...] = (16, 256)
    rollout_model: str = "small"
    rollout_sessions: tuple[int, ...] = (64, 256)
    rollout_steady: float = 10.0  # seconds of the steady window before the switch window
    rollout_window: float = 10.0  # seconds around the switch (SIGHUP in its middle)
    rollout_lifetime: float = 2.0  # seconds each session lives before a new one replaces it

    @classmethod
    def quick(cls) -> "Plan":
        """Under two minutes: two models, two concurrencies, one repeat, short windows."""
        return cls(
            models=("tiny", "small"),
            concurrency=(16, 256),
            batch_off_concurrency=(256,),
            repeats=1,
            warmup=0.2,
            duration=0.8,
            multiplexed_streams=(1,),
            columnar_sessions=(1024,),
            predict_shapes=((100, 64), (1000, 64)),
            predict_calls=1,
            memory_sessions=(10_000,),
            durability_sessions=(64,),
            tracing_sessions=(64,),
            rollout_sessions=(64,),
            rollout_steady=3.0,
            rollout_window=4.0,
            rollout_lifetime=1.0,
        )

    def restricted(self, models: tuple[str, ...] | None, scenarios: tuple[str, ...] | None) -> "Plan":
        changes = {}
        if models:
            changes["models"] = models
            for field in ("open_model", "multiplexed_model", "columnar_model", "predict_model", "merged_model",
                          "oip_model", "memory_model", "durability_model", "tracing_model", "rollout_model"):
                if getattr(self, field) not in models:
                    changes[field] = models[-1]
        if scenarios:
            changes["scenarios"] = scenarios
        return dataclasses.replace(self, **changes)
