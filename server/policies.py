"""The settings that choose a behaviour rather than a size, one enum each: the settings parse them, the engine and
the store act on them. Imports nothing of the server, so anything may import it."""

import asyncio
import enum


class FullPolicy(enum.StrEnum):
    """What a session quota or the server's session capacity does to one session too many."""

    REFUSE = "refuse"
    EVICT = "evict"  # close the least recently used idle session to make room


class Durability(enum.StrEnum):
    """With a state store: what a step's answer waits for (see server/store/redis_sessions.py)."""

    NONE = "none"
    CHECKPOINT = "checkpoint"
    EVERY_STEP = "every-step"


class EventLoop(enum.StrEnum):
    """The event loop the server runs on."""

    ASYNCIO = "asyncio"  # the standard library's
    UVLOOP = "uvloop"  # libuv's, through uvloop

    def factory(self):
        """The loop's constructor; uvloop is imported only when chosen."""
        if self is EventLoop.UVLOOP:
            import uvloop
            return uvloop.new_event_loop
        return asyncio.new_event_loop
