"""Where sessions are kept beyond this process's memory, behind one seam (`SessionStore`): nowhere, a snapshot
directory, or Redis shared by replicas. Knows nothing about the engine or gRPC."""

from server.store.record import KeptAnswer, RecordRejected, SessionRecord, model_identity
from server.store.redis_sessions import Durability, RedisSessionStore
from server.store.redis_store import Lease, RedisStateStore
from server.store.seam import (
    LiveSession,
    MemoryStore,
    SessionGone,
    SessionMoved,
    SessionStore,
    StoreUnavailable,
)
from server.store.snapshot import SnapshotStore

__all__ = ["Durability", "KeptAnswer", "Lease", "LiveSession", "MemoryStore", "RecordRejected", "RedisSessionStore",
           "RedisStateStore", "SessionGone", "SessionMoved", "SessionRecord", "SessionStore", "SnapshotStore",
           "StoreUnavailable", "model_identity"]
