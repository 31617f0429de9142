"""Per-principal request rate: one token bucket per owner."""

import time

from server.engine.errors import LimitExceeded


class RateLimiter:
    """Each owner may make `burst` requests at once, then `rate` per second; `rate` 0 turns it off."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        # owner -> (tokens left, when counted). Owners are principals (from the tokens file or certificates
        # signed by the operator's CA), so this stays as small as the set of configured clients.
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, owner: str) -> None:
        """Takes one request from `owner`'s bucket, or raises LimitExceeded and takes nothing."""
        if not self._rate:
            return
        now = self._clock()
        tokens, then = self._buckets.get(owner, (self._burst, now))
        tokens = min(self._burst, tokens + (now - then) * self._rate)
        if tokens < 1:
            self._buckets[owner] = (tokens, now)
            wait = (1 - tokens) / self._rate
            raise LimitExceeded(f"too many requests from this principal (rate_limit={self._rate:g}/s, "
                                f"rate_limit_burst={self._burst:g}); retry in {wait:.2g}s", "rate_limit", wait)
        self._buckets[owner] = (tokens - 1, now)
