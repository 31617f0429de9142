"""One model and one model version as the registry keeps them (a version's state, why, its engine) and the loading
of a version's file."""

import dataclasses
import enum
import json
from pathlib import Path

import torch

from server.engine import Engine, ModelUnavailable, VersionRetired
from server.model import ModelMetadata, ModelRuntime
from server.models.repository import ModelEntry

LOADING_RETRY_SECONDS = 1.0


class VersionState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    DRAINING = "DRAINING"  # no new sessions; its sessions go on until they end or --drain-timeout
    UNAVAILABLE = "UNAVAILABLE"  # failed to load (the reason says why) or unloaded


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    name: str
    version: int
    state: VersionState
    reason: str
    metadata: ModelMetadata | None  # None until loaded, or when the file could not be read
    live_sessions: int
    is_default: bool = False  # new sessions and stateless calls get this version
    failed: bool = False  # UNAVAILABLE because it could not be loaded (not merely unloaded)


@dataclasses.dataclass(eq=False)
class Model:
    entry: ModelEntry
    default: int = 0  # the version new sessions and stateless calls get; 0: none ready
    unloaded: bool = False  # unload() was asked: reload() leaves it alone until load() is


@dataclasses.dataclass(eq=False)
class Version:
    name: str
    version: int
    path: Path
    stamp: tuple  # the file's (mtime, size) when it was loaded: a failed version is retried once it changes
    state: VersionState = VersionState.LOADING
    reason: str = ""
    engine: Engine | None = None
    metadata: ModelMetadata | None = None
    failed: bool = False  # it could not be loaded (not merely unloaded)
    drain_task: object = None  # the asyncio.Task that ends its sessions at the drain timeout
    drain_expired: bool = False

    def status(self, is_default: bool) -> VersionStatus:
        return VersionStatus(self.name, self.version, self.state, self.reason, self.metadata,
                             self.engine.session_count if self.engine else 0, is_default, self.failed)

    def refusal(self) -> Exception:
        """Why this version takes no new work."""
        if self.state is VersionState.LOADING:
            return ModelUnavailable(f"version {self.version} of model {self.name} is loading", LOADING_RETRY_SECONDS)
        return VersionRetired(f"version {self.version} of model {self.name} is {self.state.value} ({self.reason}); "
                              "leave the version unset for the current one", self.name, self.version)

    def needs_loading(self) -> bool:
        """Unloaded, or failed and its file has changed since."""
        return self.state is VersionState.UNAVAILABLE and (not self.failed or self.stamp != file_stamp(self.path))


def loaded(versions: dict[tuple[str, int], Version], name: str | None = None) -> list[Version]:
    """The versions with an engine (serving or draining), of the model `name` or of every model."""
    return [v for v in versions.values() if v.engine is not None and (name is None or v.name == name)]


def load_runtime(path: Path, device: str, torch_threads: int) -> ModelRuntime:
    """On a worker thread, beside the model thread (a load never pauses traffic), with as few torch threads."""
    torch.set_num_threads(torch_threads)
    return ModelRuntime.load(path, device)


def check_carry(serving: list[Version], metadata: ModelMetadata) -> None:
    """state_migration carry moves sessions between versions: their states must have the same shape."""
    for v in serving:
        m = v.metadata
        if (m.num_layers, m.hidden_size) != (metadata.num_layers, metadata.hidden_size):
            raise ValueError(f"state_migration carry needs the state shape of version {v.version} "
                             f"([{m.num_layers}, {m.hidden_size}]), this version's is "
                             f"[{metadata.num_layers}, {metadata.hidden_size}]")


def named(identity: str) -> tuple[str, int]:
    """(model name, version number) of a stored model identity (0: a version that is not a number)."""
    try:
        fields = json.loads(identity)
        name, version = str(fields["name"]), str(fields["version"])
    except (ValueError, KeyError, TypeError):
        return identity, 0
    return name, int(version) if version.isdigit() else 0


def file_stamp(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return ()
    return stat.st_mtime_ns, stat.st_size
