"""Checks on request tensors, done before anything is queued so a rejected request changes nothing."""

import numpy as np

from server.engine.errors import InvalidInput, LimitExceeded


def check_tensor(name: str, array: np.ndarray, expected: tuple, allow_nonfinite: bool) -> None:
    """`expected` holds an int per fixed dimension and None per free one (which must be >= 1)."""
    if array.ndim != len(expected) or any(e is not None and d != e for d, e in zip(array.shape, expected)):
        wanted = ", ".join("N" if e is None else str(e) for e in expected)
        raise InvalidInput(f"{name} has shape {list(array.shape)}, expected [{wanted}]")
    if array.size == 0:
        raise InvalidInput(f"{name} is empty (shape {list(array.shape)}); send at least one time step")
    if not allow_nonfinite and not np.isfinite(array).all():
        raise InvalidInput(f"{name} contains NaN or Inf; the server rejects non-finite values (allow_nonfinite)")


def check_at_most(name: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise LimitExceeded(
            f"{name} is {value}, more than the server's {setting} of {limit}; split the request", setting)
