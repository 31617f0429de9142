"""The one settings object: every field is a command-line flag and an LSTMSERVE_* environment variable."""

import argparse
import dataclasses
import enum
import os
from collections.abc import Mapping, Sequence

from server.policies import Durability, EventLoop, FullPolicy

ENV_PREFIX = "LSTMSERVE_"
MAX_PORT = 65535  # gRPC would take a larger one modulo 65536 and listen there
GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's message size options are C ints
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # in any case: the entry point upper-cases it


def _setting(default, help: str, minimum: float | None = None, maximum: float | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum})


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: str = _setting("models/demo.pt", "TorchScript model file to serve (one model, version 1), unless "
                               "--model-repository is given")
    model_repository: str = _setting("", "directory of models, DIR/<name>/<version>/model.pt with an optional "
                                     "DIR/<name>/config.json (version policy, default version, batching); "
                                     "replaces --model-path")
    default_model: str = _setting("", "model of requests that name none, when the repository holds several")
    poll_repository: float = _setting(0.0, "seconds between re-reads of the repository (0: only on SIGHUP or a "
                                      "load request)", 0)
    drain_timeout: float = _setting(300.0, "seconds a retired version keeps serving its sessions before they end "
                                    "with FAILED_PRECONDITION and it is unloaded", 0)
    host: str = _setting("127.0.0.1", "address the gRPC server listens on")
    port: int = _setting(50051, "gRPC port (0 picks a free one)", 0, MAX_PORT)
    metrics_host: str = _setting("127.0.0.1", "address of the Prometheus /metrics endpoint")
    metrics_port: int = _setting(9090, "Prometheus port (0 picks a free one, -1 disables it)", -1, MAX_PORT)
    device: str = _setting("cpu", "torch device for the model and the state pool: cpu, cuda, cuda:N")
    torch_threads: int = _setting(1, "intra-op threads for the model; the gRPC layer needs a core of its own", 1)
    max_batch_size: int = _setting(256, "most sessions advanced by one model call", 1)
    max_batch_delay: float = _setting(0.0, "seconds a batch waits to fill up (0: take what is ready)", 0)
    idle_timeout: float = _setting(600.0, "seconds after which an unused session is closed", 0.01)
    max_sessions: int = _setting(100_000, "most live sessions, every model together; no state pool grows "
                                 "past this", 1)
    max_sessions_per_owner: int = _setting(100_000, "most live sessions of one principal (owner), every model "
                                           "together", 1)
    max_state_bytes: int = _setting(1 << 30, "most bytes of session state (h, c) the state pool of each "
                                  "model version may hold", 1)
    full_policy: FullPolicy = _setting(FullPolicy.REFUSE, "at a session limit: refuse new sessions, or evict "
                                       "the least recently used idle one")
    answers_kept: int = _setting(32, "answers of the latest requests kept per session, so retries and "
                                 "resumed streams are answered without applying a step twice", 1)
    initial_capacity: int = _setting(1024, "session slots preallocated at start", 1)
    max_steps_per_request: int = _setting(1024, "most time steps in one Step or Stream request", 1)
    max_sequence_length: int = _setting(100_000, "most time steps in one Predict request", 1)
    max_predict_batch: int = _setting(256, "most batch rows of concurrent stateless Predicts (and OIP requests "
                                      "without a sequence id) of equal seq_len merged into one model call; "
                                      "1 turns merging off", 1)
    max_batch_entries: int = _setting(4096, "most entries (steps) in one StreamBatch or StreamColumns "
                                      "message; a longer message is refused whole with RESOURCE_EXHAUSTED", 1)
    max_queued_requests: int = _setting(100_000, "most requests queued server-wide before RESOURCE_EXHAUSTED", 1)
    max_message_bytes: int = _setting(64 * 1024 * 1024, "largest gRPC message accepted or sent", 1024,
                                      GRPC_MAX_MESSAGE_BYTES)
    stream_window: int = _setting(128, "requests one stream may have in flight before the server stops reading", 1)
    allow_nonfinite: bool = _setting(False, "accept NaN and Inf in inputs and states")
    shutdown_grace: float = _setting(30.0, "seconds in-flight work may take to finish on SIGTERM", 0)
    state_store: str = _setting("", "redis://host:port/db or unix:///path.sock shared by replicas; empty: memory")
    durability: Durability = _setting(Durability.EVERY_STEP, "with a state store: what a step's answer waits for")
    checkpoint_every: int = _setting(100, "checkpoint durability: write a session once this many steps are new", 1)
    checkpoint_interval: float = _setting(5.0, "checkpoint durability: seconds between writes of unwritten state", 0.01)
    lease_ttl: float = _setting(5.0, "seconds a replica's claim on a session lasts unless renewed", 0.1)
    lease_wait: float = _setting(6.0, "seconds a request waits for another replica's claim to lapse", 0)
    snapshot_dir: str = _setting("", "directory where live sessions are saved on shutdown and restored on "
                                 "start (empty: sessions end with the process)")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    tls_cert_file: str = _setting("", "PEM certificate chain of the gRPC port; turns TLS on")
    tls_key_file: str = _setting("", "PEM private key of --tls-cert-file")
    tls_client_ca_file: str = _setting("", "PEM CA(s) that must sign every client's certificate (mTLS)")
    tokens_file: str = _setting("", "lines of '<sha256 hex of a token> <principal>'; turns auth on")
    open_health_and_reflection: bool = _setting(True, "health checks and reflection need no credentials")
    rate_limit: float = _setting(0.0, "requests per second of each principal, every model together "
                                "(0: unlimited)", 0)
    rate_limit_burst: int = _setting(100, "requests a principal may make at once above --rate-limit", 1)
    event_loop: EventLoop = _setting(EventLoop.UVLOOP, "asyncio or uvloop: under 256 streams uvloop took ~25% "
                                     "less CPU per step")
    gc_freeze: bool = _setting(True, "once started, keep the start-up heap (torch, gRPC, the model) out of every "
                               "garbage collection: a full collection walked it for 30-120 ms, pausing every stream")
    gc_threshold: int = _setting(10_000, "allocations between two young-generation garbage collections (Python's "
                                 "threshold0, 700 by default): each step allocates dozens of objects that die young", 1)
    otlp_endpoint: str = _setting("", "OTLP/gRPC collector that receives traces: http://host:4317 (plaintext) or "
                                  "https://host:4317 (TLS); the standard OTEL_* variables tune the rest. "
                                  "Empty: tracing off")

    def __post_init__(self):
        # a choice given by its spelling (a flag, a variable, a keyword) becomes its enum member
        for field in dataclasses.fields(self):
            if _choices(field):
                object.__setattr__(self, field.name, field.type(getattr(self, field.name)))

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def auth(self) -> bool:
        """Callers need a principal: a bearer token, or a client certificate under mutual TLS."""
        return bool(self.tokens_file or self.tls_client_ca_file)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Flags win over environment variables, which win over defaults."""
        parser = argparse.ArgumentParser(prog="lstmserve", description="Serve a TorchScript LSTM over gRPC.")
        for field in dataclasses.fields(cls):
            env = ENV_PREFIX + field.name.upper()
            default = _parse(field, environ[env], parser) if env in environ else field.default
            flag = "--" + field.name.replace("_", "-")
            choices = _choices(field)
            described = field.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
            if field.type is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                    help=f"{described} [{env}]")
            else:
                parser.add_argument(flag, type=str if choices else field.type, default=default, choices=choices,
                                    help=f"{described} (default: {field.default}) [{env}]")
        values = vars(parser.parse_args(argv))
        for field in dataclasses.fields(cls):
            minimum = field.metadata["minimum"]
            if minimum is not None and not values[field.name] >= minimum:  # NaN is neither less nor more
                parser.error(f"--{field.name.replace('_', '-')} must be at least {minimum}")
            maximum = field.metadata["maximum"]
            if maximum is not None and values[field.name] > maximum:
                parser.error(f"--{field.name.replace('_', '-')} must be at most {maximum}")
            choices = _choices(field)
            if choices and values[field.name] not in choices:
                parser.error(f"--{field.name.replace('_', '-')} must be one of {', '.join(choices)}")
        settings = cls(**values)
        if problem := settings.inconsistency():
            parser.error(problem)
        return settings

    def inconsistency(self) -> str | None:
        """Why these settings cannot work (together), or None."""
        if self.log_level.upper() not in LOG_LEVELS:
            return f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            return "--tls-cert-file and --tls-key-file go together"
        if self.snapshot_dir and self.state_store:
            return ("--snapshot-dir and --state-store are alternatives: with a state store, sessions already "
                    "outlive the process")
        if self.tls_client_ca_file and not self.tls:
            return "--tls-client-ca-file needs --tls-cert-file and --tls-key-file (mutual TLS is TLS)"
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            return (f"--otlp-endpoint {self.otlp_endpoint!r} needs its scheme: http://host:port for plaintext, "
                    "https://host:port for TLS")
        return None


def _choices(field: dataclasses.Field) -> tuple[str, ...] | None:
    """The spellings of a setting that is one of an enum's values; None for any other setting."""
    if isinstance(field.type, type) and issubclass(field.type, enum.Enum):
        return tuple(member.value for member in field.type)
    return None


def _parse(field, text: str, parser: argparse.ArgumentParser):
    if _choices(field):
        return text  # checked against the choices with the flags' values
    if field.type is bool:
        if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
            parser.error(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a boolean")
        return text.lower() in ("1", "true", "yes")
    try:
        return field.type(text)
    except ValueError:
        parser.error(f"{ENV_PREFIX}{field.name.upper()}={text!r} is not a valid {field.type.__name__}")
