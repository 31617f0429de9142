"""The one settings object: every field is a command-line flag and an LSTMSERVE_* environment variable."""

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence

from server.engine import EngineLimits

ENV_PREFIX = "LSTMSERVE_"


def _setting(default, help: str, minimum: float | None = None, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str = _setting("models/demo.pt", "TorchScript model file to serve")
    host: str = _setting("127.0.0.1", "address the gRPC server listens on")
    port: int = _setting(50051, "gRPC port (0 picks a free one)", 0)
    metrics_host: str = _setting("127.0.0.1", "address of the Prometheus /metrics endpoint")
    metrics_port: int = _setting(9090, "Prometheus port (0 picks a free one, -1 disables it)", -1)
    device: str = _setting("cpu", "torch device for the model and the state pool: cpu, cuda, cuda:N")
    torch_threads: int = _setting(1, "intra-op threads for the model; the gRPC layer needs a core of its own", 1)
    max_batch_size: int = _setting(256, "most sessions advanced by one model call", 1)
    max_batch_delay: float = _setting(0.0, "seconds a batch waits to fill up (0: take what is ready)", 0)
    idle_timeout: float = _setting(600.0, "seconds after which an unused session is closed", 0.01)
    max_sessions: int = _setting(100_000, "most live sessions; the state pool never grows past this", 1)
    max_sessions_per_owner: int = _setting(100_000, "most live sessions of one client (owner)", 1)
    max_state_bytes: int = _setting(1 << 30, "most bytes of session state (h, c) the state pool may hold", 1)
    full_policy: str = _setting("refuse", "at a session limit: refuse new sessions, or evict the least "
                                "recently used idle one", choices=("refuse", "evict"))
    answers_kept: int = _setting(32, "answers of the latest requests kept per session, so retries and "
                                 "resumed streams are answered without applying a step twice", 1)
    initial_capacity: int = _setting(1024, "session slots preallocated at start", 1)
    max_steps_per_request: int = _setting(1024, "most time steps in one Step or Stream request", 1)
    max_sequence_length: int = _setting(100_000, "most time steps in one Predict request", 1)
    max_queued_requests: int = _setting(100_000, "most requests queued server-wide before RESOURCE_EXHAUSTED", 1)
    max_message_bytes: int = _setting(64 * 1024 * 1024, "largest gRPC message accepted or sent", 1024)
    stream_window: int = _setting(128, "requests one stream may have in flight before the server stops reading", 1)
    allow_nonfinite: bool = _setting(False, "accept NaN and Inf in inputs and states")
    shutdown_grace: float = _setting(30.0, "seconds in-flight work may take to finish on SIGTERM", 0)
    snapshot_dir: str = _setting("", "directory where live sessions are saved on shutdown and restored on "
                                 "start (empty: sessions end with the process)")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")

    def engine_limits(self) -> EngineLimits:
        names = {f.name for f in dataclasses.fields(EngineLimits)}
        return EngineLimits(**{name: getattr(self, name) for name in names})

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Flags win over environment variables, which win over defaults."""
        parser = argparse.ArgumentParser(prog="lstmserve", description="Serve a TorchScript LSTM over gRPC.")
        for field in dataclasses.fields(cls):
            env = ENV_PREFIX + field.name.upper()
            default = _parse(field, environ[env], parser) if env in environ else field.default
            flag = "--" + field.name.replace("_", "-")
            if field.type is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                    help=f"{field.metadata['help']} [{env}]")
            else:
                parser.add_argument(flag, type=field.type, default=default, choices=field.metadata["choices"],
                                    help=f"{field.metadata['help']} (default: {field.default}) [{env}]")
        values = vars(parser.parse_args(argv))
        for field in dataclasses.fields(cls):
            minimum = field.metadata["minimum"]
            if minimum is not None and values[field.name] < minimum:
                parser.error(f"--{field.name.replace('_', '-')} must be at least {minimum}")
            choices = field.metadata["choices"]
            if choices and values[field.name] not in choices:
                parser.error(f"--{field.name.replace('_', '-')} must be one of {', '.join(choices)}")
        return cls(**values)


def _parse(field, text: str, parser: argparse.ArgumentParser):
    if field.type is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            parser.error(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a boolean")
        return text.lower() in ("1", "true", "yes")
    try:
        return field.type(text)
    except ValueError:
        parser.error(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a valid {field.type.__name__}")
