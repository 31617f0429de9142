"""Shared session state for several replicas: records, leases with fencing, and the Redis implementation."""

from server.store.records import Lease, SessionMoved, SessionRecord, StoreUnavailable
from server.store.redis_store import RedisStateStore

__all__ = ["Lease", "RedisStateStore", "SessionMoved", "SessionRecord", "StoreUnavailable"]
