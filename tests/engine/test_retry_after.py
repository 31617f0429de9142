"""The waits the engine's refusals carry (the transport turns them into RetryInfo): the rate limiter's is exactly
when the next request is admitted."""

import pytest

from server.engine import LimitExceeded
from server.engine.rate_limit import RateLimiter

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_limited_request_is_told_when_the_next_token_is_due():
    clock = Clock()
    limiter = RateLimiter(rate=4.0, burst=2, clock=clock)
    limiter.admit("alice")
    limiter.admit("alice")
    clock.now += 0.125  # half a token back (times in binary fractions: exact sums)
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit("alice")
    assert (refused.value.limit, refused.value.retry_after) == ("rate_limit", 0.125)
    clock.now += 0.0625
    with pytest.raises(LimitExceeded):
        limiter.admit("alice")  # too soon: still refused, and a refusal takes nothing
    clock.now += 0.0625
    limiter.admit("alice")
