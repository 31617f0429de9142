"""Session records and leases in Redis. Every write is fenced by the lease and compare-and-set on `seq`."""

import asyncio
import dataclasses
import logging
import time

import redis.asyncio as redis
from redis.exceptions import RedisError

from server.store.record import SessionRecord, decode, encode
from server.store.seam import StoreUnavailable

log = logging.getLogger(__name__)

# KEYS: lease, fence counter. ARGV: replica, lease ttl ms, key ttl ms, "1" for a new fence even if this replica
# holds the lease already. Returns {1, fence, 1 when this call made the fence} when this replica now holds the
# lease, {0, remaining ms} when another one does. The counter lives as long as the state (extended here and at
# every save): one that expired would start again at 1 and could hand a replica its old fence back after another
# replica wrote newer state.
_ACQUIRE = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder and holder ~= ARGV[1] then return {0, redis.call('PTTL', KEYS[1])} end
local fence, made = redis.call('HGET', KEYS[1], 'fence'), 0
if not holder or ARGV[4] == '1' then
  fence, made = redis.call('INCR', KEYS[2]), 1
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'fence', fence)
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tonumber(fence), made}
"""

# KEYS: state, lease, fence counter. ARGV: replica, fence, seq, lease ttl ms, state ttl ms, field, value, ...
# Returns 1 written, 0 fenced out (the lease is gone or someone else's), -1 stale (newer state stored).
_SAVE = """
if redis.call('HGET', KEYS[2], 'holder') ~= ARGV[1] or redis.call('HGET', KEYS[2], 'fence') ~= ARGV[2] then
  return 0
end
local stored = redis.call('HGET', KEYS[1], 'seq')
if stored and tonumber(stored) > tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: lease, then optionally state. ARGV: replica, fence, lease ttl ms ("0" releases; the state key is deleted).
_RENEW_OR_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then
  return 0
end
if ARGV[3] == '0' then
  redis.call('DEL', unpack(KEYS))
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


@dataclasses.dataclass(frozen=True)
class Lease:
    """The right to write one session's state; `fence` grows with every new holder."""

    session_id: str
    fence: int
    made: bool = False  # its fence was made when it was taken (it was free, or taken anew), not found held already


def _keys(session_id: str) -> tuple[str, str, str]:
    # One hash tag per session keeps a session's keys on one Redis Cluster slot.
    base = f"lstmserve:{{{session_id}}}"
    return f"{base}:state", f"{base}:lease", f"{base}:fence"


class RedisStateStore:
    def __init__(self, url: str, replica: str, lease_ttl: float, state_ttl: float, lease_wait: float):
        # A bounded pool that makes callers wait for a connection: many sessions opening at once must queue,
        # not fail with "Too many connections".
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=32, timeout=5.0, socket_timeout=2.0,
                                                     socket_connect_timeout=2.0)
        self._redis = redis.Redis(connection_pool=pool)
        self.replica = replica
        self.lease_ttl = lease_ttl
        self._lease_ms = str(int(lease_ttl * 1000))
        self._state_ms = str(int(state_ttl * 1000))
        self._lease_wait = lease_wait
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._save = self._redis.register_script(_SAVE)
        self._renew_or_release = self._redis.register_script(_RENEW_OR_RELEASE)

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def acquire(self, session_id: str, anew: bool = False) -> Lease:
        """Takes the session's lease, waiting up to `lease_wait` for another replica's to be freed or expire.
        `anew`: with a new fence even if this replica holds it, so that writes under the old one are fenced out."""
        deadline = time.monotonic() + self._lease_wait
        while True:
            lease, held_for = await self._take(session_id, anew)
            if lease is not None:
                return lease
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailable("the session is in use on another replica; retry shortly",
                                       retry_after=max(held_for, 0) / 1000)
            await asyncio.sleep(min(0.05, left))

    async def take(self, session_id: str) -> Lease | None:
        """The session's lease at once; None while another replica holds it."""
        return (await self._take(session_id, anew=False))[0]

    async def _take(self, session_id: str, anew: bool) -> tuple[Lease | None, int]:
        """The lease, or None and the milliseconds that another replica's has left."""
        _, lease_key, fence_key = _keys(session_id)
        args = [self.replica, self._lease_ms, self._state_ms, "1" if anew else "0"]
        granted, value, *made = await self._call(self._acquire, [lease_key, fence_key], args)
        return (Lease(session_id, int(value), made == [1]), 0) if granted else (None, int(value))

    async def load(self, session_id: str) -> SessionRecord | None:
        data = await self._call(self._redis.hget, _keys(session_id)[0], "record")
        return None if data is None else decode(data)[0]

    async def save(self, writes: list[tuple[SessionRecord, Lease]]) -> list[int]:
        """Writes many records in one pipeline; per record 1 written, 0 fenced out, -1 stale."""
        if not writes:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for record, lease in writes:
                await self._save(keys=list(_keys(record.session_id)),
                                 args=[self.replica, lease.fence, record.last_applied_seq, self._lease_ms,
                                       self._state_ms, "seq", record.last_applied_seq, "record", encode(record)],
                                 client=pipe)
            return [int(r) for r in await self._call(pipe.execute)]

    async def renew(self, leases: list[Lease]) -> list[bool]:
        """Extends many leases in one pipeline; False where the lease was lost."""
        return await self._renew_or_release_many(leases, self._lease_ms, with_state=False)

    async def release(self, lease: Lease, delete: bool = False) -> None:
        """Gives the lease up (keeping the record for another replica), or deletes the session."""
        await self._renew_or_release_many([lease], "0", with_state=delete)

    async def _renew_or_release_many(self, leases: list[Lease], ttl_ms: str, with_state: bool) -> list[bool]:
        if not leases:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for lease in leases:
                state_key, lease_key, _ = _keys(lease.session_id)
                keys = [lease_key, state_key] if with_state else [lease_key]
                await self._renew_or_release(keys=keys, args=[self.replica, lease.fence, ttl_ms], client=pipe)
            return [bool(r) for r in await self._call(pipe.execute)]

    async def _call(self, fn, *args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except RedisError as error:
            log.warning("state store error: %s", error)
            raise StoreUnavailable("the session state store is unreachable; retry shortly") from error
