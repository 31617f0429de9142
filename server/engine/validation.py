"""Checks on request tensors, done before anything is queued so a rejected request changes nothing."""

import math

import numpy as np
import torch

from server.engine.errors import InvalidInput, LimitExceeded

_sum = np.add.reduce  # ndarray.sum without its Python wrapper: this runs once per streamed step


def check_tensor(name: str, array: np.ndarray, expected: tuple, allow_nonfinite: bool) -> None:
    """`expected` holds an int per fixed dimension and None per free one (which must be >= 1). `name` is the
    request field the array came from: the refusal names it, and its `.shape` when that is at fault.

    Runs once per streamed step, so it is written for speed: a plain loop over the dimensions, and a
    float64 sum for finiteness (NaN or infinite exactly when an element is, since float32 values
    cannot overflow it), one reduction instead of a mask and a reduction.
    """
    if not _shape_matches(array.shape, expected):
        wanted = ", ".join("N" if e is None else str(e) for e in expected)
        raise InvalidInput(f"{name} has shape {list(array.shape)}, expected [{wanted}]", f"{name}.shape")
    if array.size == 0:
        raise InvalidInput(f"{name} is empty (shape {list(array.shape)}); send at least one time step",
                           f"{name}.shape")
    if not allow_nonfinite and not math.isfinite(_sum(array, None, np.float64)):
        raise InvalidInput(f"{name} contains NaN or Inf; the server rejects non-finite values (allow_nonfinite)",
                           name)


def check_at_most(name: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise LimitExceeded(
            f"{name} is {value}, more than the server's {setting} of {limit}; split the request", setting)


def initial_state(h: np.ndarray | None, c: np.ndarray | None, shape: tuple, device: torch.device,
                  allow_nonfinite: bool, names: tuple[str, str] = ("h", "c")) -> tuple[torch.Tensor, torch.Tensor]:
    """`(h, c)` as float32 tensors of `shape`, zeros (on `device`) where not given; `names` are their request
    fields."""
    state = []
    for name, given in zip(names, (h, c)):
        if given is None:
            state.append(torch.zeros(shape, device=device))
        else:
            check_tensor(name, given, shape, allow_nonfinite)
            state.append(torch.from_numpy(np.array(given, dtype=np.float32)))
    return state[0], state[1]


def _shape_matches(shape: tuple, expected: tuple) -> bool:
    if len(shape) != len(expected):
        return False
    for dim, wanted in zip(shape, expected, strict=True):
        if wanted is not None and dim != wanted:
            return False
    return True
