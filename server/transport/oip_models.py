"""The Open Inference Protocol's view of the model registry: a request's model name and version string to the
engine that serves it, sequences pinned to the version of their START, the repository index, and load and
unload with Triton's semantics. No protobuf here: oip.py converts."""

import asyncio
import collections

from server.engine import Engine, EngineError, ModelNotFound, Sequences, VersionRetired
from server.logsafe import clip
from server.models.registry import ModelRegistry, VersionState, VersionStatus
from server.transport.oip_convert import STATE_OUTPUTS, InferCall, LoadFailed, UnknownModel

SERVING = (VersionState.READY, VersionState.DRAINING)  # states whose engine still answers its sequences
# Sequences started and not ended by their client, remembered (session id by model, owner and sequence id: each
# model has its own sequence ids) to tell a client whose sequence a drain timeout ended why it is gone; the oldest
# are forgotten first.
UNENDED_KEPT = 100_000


class OipModels:
    def __init__(self, registry: ModelRegistry):
        self._registry = registry
        self._unended: collections.OrderedDict[tuple, str] = collections.OrderedDict()

    def engine(self, name: str, version: str = "", new_work: bool = True) -> Engine:
        """The engine of `name` at `version` (empty: the model's current version). `new_work`: a stateless call
        or a START, which a draining version refuses; else (metadata, statistics) a draining version's too."""
        return self._registry.engine(name, self._number(name, version), new_work)

    async def sequence_step(self, name: str, version: str, call: InferCall, owner: str
                            ) -> tuple[Engine, asyncio.Future]:
        """Queues a sequence request on the version that serves it; returns that version's engine and the
        request's answer (a future)."""
        key = (name, owner, call.sequence_id)
        sequences = await self._sequences(name, version, call.sequence_id, owner, call.start)
        answer = await sequences.step(call.sequence_id, call.inputs["INPUT"], call.start, call.end,
                                      call.inputs.get("H0"), call.inputs.get("C0"), owner=owner,
                                      with_state=any(output in STATE_OUTPUTS for output in call.outputs))
        if call.start:  # only once the START is taken: a refused one changes no sequence, on any version
            self._end_elsewhere(name, sequences.engine, call.sequence_id, owner)
        if call.end:
            self._unended.pop(key, None)
        elif call.start:
            self._unended[key] = sequences.session_of(call.sequence_id, owner)
            self._unended.move_to_end(key)
            while len(self._unended) > UNENDED_KEPT:
                self._unended.popitem(last=False)
        return sequences.engine, answer

    async def _sequences(self, name: str, version: str, sequence_id, owner: str, start: bool) -> Sequences:
        """Where a sequence's request goes. START: the version asked for, or the current one. Every other
        request: the version its sequence started on, whatever the current version is now."""
        if start:
            return self._registry.sequences(self.engine(name, version))
        if not version and (current := self._current_sequences(name)) and current.active(sequence_id, owner):
            return current  # the common case, found without listing the model's versions
        candidates = [self.engine(name, version, new_work=False)] if version else self._serving(name)
        for engine in candidates:
            if self._registry.sequences(engine).active(sequence_id, owner):
                return self._registry.sequences(engine)
        if (session_id := self._unended.get((name, owner, sequence_id))) is not None:
            await self._refuse_if_retired(session_id, owner)
        # not live on any version: the current version's sequences say so ("send sequence_start=true")
        return self._registry.sequences(self.engine(name, version, new_work=False))

    def _end_elsewhere(self, name: str, engine: Engine, sequence_id, owner: str) -> None:
        """A START taken on `engine` ends a live sequence with that id on another version of the model, as a
        START on a live id ends it on its own version."""
        for other in self._serving(name):
            if other is not engine:
                self._registry.sequences(other).end(sequence_id, owner)

    def _current_sequences(self, name: str) -> Sequences | None:
        """The sequences of the model's current version; None when it has none (or no such model)."""
        try:
            return self._registry.sequences(self._registry.engine(name, 0, new_work=False)) if name else None
        except EngineError:
            return None

    async def _refuse_if_retired(self, session_id: str, owner: str) -> None:
        """FAILED_PRECONDITION naming the version, when its drain timeout ended the sequence's session."""
        try:
            await self._registry.engine_of_session(session_id, owner)
        except VersionRetired:
            raise
        except EngineError:
            pass  # gone otherwise (expired): the answer for a sequence that is not active says what to do

    def ready(self, name: str, version: str) -> bool:
        """Whether the version (empty: the model's current version) takes new sequences and calls."""
        try:
            number = self._number(name, version)
        except UnknownModel:
            return False
        return any(s.state is VersionState.READY and (s.version == number or (not number and s.is_default))
                   for s in self.statuses(name))

    def served_versions(self, name: str) -> list[str]:
        """The versions of the model that answer requests, as OIP names them."""
        return [version_name(s) for s in self.statuses(name) if s.state in SERVING]

    def statuses(self, name: str = "") -> list[VersionStatus]:
        """Every version the registry knows (of one model, when named), in model and version order."""
        return [s for s in self._registry.statuses() if not name or s.name == name]

    async def load(self, name: str) -> None:
        """Triton's load: re-reads the model's directory and applies its version policy. Fails, as Triton's
        does, when a version of the model could not be loaded (the versions that could serve on)."""
        try:
            await self._registry.load(name)
        except ModelNotFound as error:
            raise UnknownModel(str(error)) from error
        failed = [s for s in self.statuses(name) if s.failed]
        if failed:
            raise LoadFailed(f"load of model {clip(name)} failed: " + "; ".join(
                f"version {s.version} is UNAVAILABLE: {s.reason}" for s in failed))

    async def unload(self, name: str) -> None:
        """Triton's unload: every version of the model starts draining; its sequences go on until they end, or
        until --drain-timeout."""
        try:
            await self._registry.unload(name)
        except ModelNotFound as error:
            raise UnknownModel(str(error)) from error

    def _serving(self, name: str) -> list[Engine]:
        """The engines of the model's versions that still answer sequences, the current version first."""
        statuses = sorted((s for s in self.statuses(name) if s.state in SERVING), key=lambda s: not s.is_default)
        return [self._registry.engine(name, s.version, new_work=False) for s in statuses]

    def _number(self, name: str, version: str) -> int:
        """The registry's version number for OIP's version string: the directory's number, or the model file's
        own version (a --model-path file's metadata may say "2024-06" or a hash); 0 for empty."""
        statuses = self.statuses(name) if name else []
        if not statuses:
            raise UnknownModel(f"model {clip(name)} is not in the repository; RepositoryIndex lists the models")
        if not version:
            return 0
        for s in statuses:
            if version in (str(s.version), version_name(s)):
                return s.version
        raise UnknownModel(f"model {clip(name)} has no version {clip(version)}; it has "
                           f"{', '.join(version_name(s) for s in statuses)} (leave the version empty for the "
                           "current one)")


def version_name(status: VersionStatus) -> str:
    """A version as OIP shows it: the model file's own version (the directory's number in a repository)."""
    return status.metadata.version if status.metadata else str(status.version)
