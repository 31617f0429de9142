"""What may stand in a log line or an error message for a secret, an identifier, or text a client sent."""

import hashlib

CLIP_CHARACTERS = 64


def fingerprint(secret: str) -> str:
    """A short, stable stand-in for a session id or token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def clip(value) -> str:
    """A client-supplied value (a model name, a sequence id, ...) as an error message shows it: its repr, cut
    after 64 characters with "...". A status message travels in gRPC metadata, capped at 16 KiB: a 1 MB name
    echoed whole would turn the answer into RESOURCE_EXHAUSTED and hide the real error."""
    shown = repr(value)
    return shown if len(shown) <= CLIP_CHARACTERS else shown[:CLIP_CHARACTERS] + "..."
