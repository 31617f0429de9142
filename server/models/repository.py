"""A model repository on disk, laid out like Triton's: `DIR/<name>/<version>/model.pt`, and per model an optional
`DIR/<name>/config.json` (version policy, default version, batching limits, state migration). Reading only: what
to load and when is the registry's business."""

import dataclasses
import json
import logging
import zipfile
from collections.abc import Iterable
from pathlib import Path

from server.model.metadata import METADATA_FILE

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
# The engine limits a model's config.json may set for that model alone.
BATCHING_LIMITS = {"max_batch_size": int, "max_batch_delay": float, "max_steps_per_request": int,
                   "max_sequence_length": int}
STATE_MIGRATIONS = ("", "carry")


class ConfigError(ValueError):
    """A config.json the repository cannot use; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk are served (Triton's version_policy): the newest `num_versions`, all, or
    the `versions` listed."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: Iterable[int]) -> set[int]:
        available = set(available)
        if self.kind == "all":
            return available
        if self.kind == "specific":
            return available & set(self.versions)
        return set(sorted(available)[-self.num_versions:])

    @classmethod
    def parse(cls, value) -> "VersionPolicy":
        """From config.json's `version_policy`: {"latest": {"num_versions": N}}, {"all": {}} or
        {"specific": {"versions": [..]}}."""
        if value is None:
            return cls()
        if not isinstance(value, dict) or len(value) != 1:
            raise ConfigError('version_policy is one of {"latest": {"num_versions": N}}, {"all": {}}, '
                              '{"specific": {"versions": [1, 2]}}')
        (kind, body), = value.items()
        body = body or {}
        if kind == "all":
            return cls("all")
        if kind == "latest":
            return cls("latest", num_versions=_positive(body.get("num_versions", 1), "latest.num_versions"))
        if kind == "specific":
            versions = body.get("versions")
            if not isinstance(versions, list) or not versions:
                raise ConfigError("version_policy.specific.versions is a list of version numbers")
            return cls("specific", versions=tuple(_positive(v, "a specific version") for v in versions))
        raise ConfigError(f"unknown version_policy {kind!r}: use latest, all or specific")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's config.json; every field has a default, so the file is optional."""

    policy: VersionPolicy = VersionPolicy()
    default_version: int = 0  # 0: the newest ready version
    limits: dict = dataclasses.field(default_factory=dict)  # overrides of BATCHING_LIMITS for this model
    state_migration: str = ""  # "carry": sessions of a retired version move to the default at their next step

    @classmethod
    def parse(cls, text: str) -> "ModelConfig":
        try:
            fields = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"not JSON: {error}") from error
        if not isinstance(fields, dict):
            raise ConfigError("not a JSON object")
        unknown = set(fields) - {"version_policy", "default_version", "batching", "state_migration"}
        if unknown:
            raise ConfigError(f"unknown fields {sorted(unknown)}: version_policy, default_version, batching, "
                              "state_migration are known")
        migration = fields.get("state_migration", "")
        if migration not in STATE_MIGRATIONS:
            raise ConfigError(f'state_migration {migration!r}: leave it out, or "carry"')
        default = fields.get("default_version", 0)
        return cls(VersionPolicy.parse(fields.get("version_policy")),
                   0 if default == 0 else _positive(default, "default_version"),
                   _limits(fields.get("batching", {})), migration)


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One model as the repository holds it: its version files, its config, or why the config is unusable.
    `renamed`: its versions are named by the repository (name, version number), not by their files' metadata."""

    name: str
    versions: dict[int, Path]
    config: ModelConfig = ModelConfig()
    problem: str = ""  # a config.json that cannot be used: the model keeps what it serves
    renamed: bool = True

    @property
    def selected(self) -> set[int]:
        return self.config.policy.select(self.versions)


def scan(directory: str | Path) -> dict[str, ModelEntry]:
    """Every model under `directory`; a directory without a positive-integer version directory holding
    model.pt is not a model (a version directory without model.pt is skipped: it may be being copied)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model repository {directory} is not a directory")
    entries = {}
    for model_dir in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = {int(p.name): p / MODEL_FILE for p in model_dir.iterdir()
                    if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILE).is_file()}
        entries[model_dir.name] = _entry(model_dir, versions)
    return entries


def single_file(path: str | Path) -> dict[str, ModelEntry]:
    """`--model-path FILE`: one model, version 1, named and versioned by its file's own metadata."""
    path = Path(path)
    return {model_name(path): ModelEntry(model_name(path), {1: path}, renamed=False)}


def model_name(path: Path) -> str:
    """The name in a model file's lstmserve metadata, without loading it; the file's stem when it has none (as
    for a bare scripted nn.LSTM, whose metadata the runtime infers under that name)."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")]
            if found:
                return str(json.loads(archive.read(found[0]))["name"])
    except (OSError, zipfile.BadZipFile, ValueError, KeyError):
        pass  # the runtime's load says what is wrong with the file
    return path.stem


def _entry(model_dir: Path, versions: dict[int, Path]) -> ModelEntry:
    config_path = model_dir / CONFIG_FILE
    if not config_path.exists():
        return ModelEntry(model_dir.name, versions)
    try:
        return ModelEntry(model_dir.name, versions, ModelConfig.parse(config_path.read_text()))
    except (OSError, ConfigError) as error:
        log.error("model %s: cannot use %s: %s", model_dir.name, config_path, error)
        return ModelEntry(model_dir.name, versions, problem=f"{config_path}: {error}")


def _limits(batching) -> dict:
    if not isinstance(batching, dict):
        raise ConfigError(f"batching is an object of {', '.join(BATCHING_LIMITS)}")
    limits = {}
    for key, value in batching.items():
        if key not in BATCHING_LIMITS:
            raise ConfigError(f"unknown batching limit {key!r}: {', '.join(BATCHING_LIMITS)} are known")
        kind = BATCHING_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or \
                (kind is int and (value != int(value) or value < 1)):
            raise ConfigError(f"batching.{key} must be a {'positive integer' if kind is int else 'number >= 0'}")
        limits[key] = kind(value)
    return limits


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, not {value!r}")
    return value
