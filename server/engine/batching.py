"""Batch formation, kept free of I/O so it can be tested on its own."""

from collections import deque

from server.engine.sessions import Session


def take_batch(ready: deque[Session], max_batch_size: int) -> list[Session]:
    """Removes and returns up to `max_batch_size` ready sessions whose head steps have one length.

    The length is that of the longest-waiting session's head request, so every length is served in
    turn; sessions with other lengths keep their place in the queue. One call over [T, B, input]
    then advances the whole batch, and a failure leaves no session half-updated.
    """
    if not ready:
        return []
    steps = ready[0].pending[0].steps
    batch: list[Session] = []
    skipped: list[Session] = []
    while ready and len(batch) < max_batch_size:
        session = ready.popleft()
        (batch if session.pending[0].steps == steps else skipped).append(session)
    ready.extendleft(reversed(skipped))
    return batch
