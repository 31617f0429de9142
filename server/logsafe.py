"""What may stand in a log line for a secret or an identifier that grants access."""

import hashlib


def fingerprint(secret: str) -> str:
    """A short, stable stand-in for a session id or token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]
