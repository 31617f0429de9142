"""Wire codec for `lstmserve.v1.Tensor`: a shape plus packed little-endian float32 bytes."""

import functools
import math
from collections.abc import Iterable

import numpy as np

from lstmserve.v1 import lstm_service_pb2 as pb

WIRE_DTYPE = np.dtype("<f4")
MAX_RANK = 3  # the API's largest tensors: Predict's [seq_len, batch, input] and [layers, batch, hidden]
MAX_DIMENSION = 2**31 - 1


class TensorFormatError(ValueError):
    """A Tensor message whose shape and payload do not agree. `field`: the part at fault (`inputs.shape`,
    `h0.data`), or the tensor's name when it is the whole of it."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def to_proto(array) -> pb.Tensor:
    """Packs any array-like (numpy array, torch tensor, nested lists) as a float32 Tensor."""
    return fill(pb.Tensor(), array)


def fill(tensor: pb.Tensor, array) -> pb.Tensor:
    """Packs `array` into an existing Tensor field, e.g. `fill(response.outputs, y)`.

    Passing a Tensor to a message's constructor copies it (the whole payload) once more; filling the
    response's own field in place does not, which matters for Predict's megabytes.
    """
    if hasattr(array, "detach"):  # a torch tensor, possibly on a GPU or requiring grad
        array = array.detach().cpu().numpy()
    packed = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    tensor.shape[:] = packed.shape
    tensor.data = packed.tobytes()
    return tensor


def encoded(header: bytes, fields: Iterable[tuple[int, np.ndarray]]) -> bytes:
    """A serialized message: `header` (the message's other fields, serialized) and, for each `(number, array)`,
    field `number` holding the array as a Tensor. Each payload is copied once, into the returned bytes, where
    fill() and serialising copy it three times (tobytes, into the message, out of it) and hold two copies at
    once: 30 ms a copy for Predict's 33 MB answers. gRPC sends bytes as they are (see the server's
    PreEncodedResponses); the message parses as if it had been built field by field."""
    parts = [header]
    for number, array in fields:
        packed = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
        shape = b"".join(_varint(dim) for dim in packed.shape)
        tensor_head = b"\x0a" + _varint(len(shape)) + shape + b"\x12" + _varint(packed.nbytes)
        parts += [field_head(number, len(tensor_head) + packed.nbytes), tensor_head, packed.data]
    return b"".join(parts)


def length_delimited(number: int, *payload) -> list:
    """The parts of a length-delimited field `number` (bytes, or an embedded message) holding the concatenation
    of `payload` (bytes or contiguous buffers), for b"".join: the payload is not copied until it is joined."""
    length = sum(memoryview(part).nbytes for part in payload)
    return [field_head(number, length), *payload]


@functools.lru_cache(maxsize=4096)
def field_head(number: int, length: int) -> bytes:
    """The tag and length that start a length-delimited field `number` of `length` bytes (cached: a stream's
    answers repeat a few sizes)."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def from_proto(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Unpacks a Tensor without copying the bytes.

    The declared shape is checked against the payload before anything is allocated, so a huge shape
    with a small payload costs nothing. `name`: the request field the tensor came from, named by refusals.
    """
    shape = tuple(tensor.shape)
    count = element_count(shape, name)
    data, values = tensor.data, tensor.values  # read each field once: every read builds a new object
    if len(values):
        if data:
            raise TensorFormatError(f"{name}: set either data or values, not both", name)
        if len(values) != count:
            raise TensorFormatError(f"{name}: shape {list(shape)} needs {count} values, got {len(values)}",
                                    f"{name}.values")
        return np.asarray(values, dtype=np.float32).reshape(shape)
    if len(data) != count * WIRE_DTYPE.itemsize:
        raise TensorFormatError(
            f"{name}: shape {list(shape)} needs {count * WIRE_DTYPE.itemsize} bytes of float32, "
            f"got {len(data)}", f"{name}.data")
    return np.frombuffer(data, dtype=WIRE_DTYPE).reshape(shape)


def element_count(shape: tuple[int, ...], name: str) -> int:
    """The number of elements `shape` declares, once it is known that numpy can lay it out.

    Refused here, before numpy sees them (numpy's own errors would be INTERNAL and a traceback per request):
    more dimensions than any of the API's tensors has (numpy stops at 64), a negative dimension, and a zero
    dimension beside others whose product overflows numpy's index type (no elements, no possible layout). A
    non-zero count needs a payload of its size, which the caller checks.
    """
    if len(shape) > MAX_RANK:  # the shape itself is not echoed: it may have thousands of dimensions
        raise TensorFormatError(f"{name}: shape has {len(shape)} dimensions; tensors here have at most {MAX_RANK}",
                                f"{name}.shape")
    if min(shape, default=0) < 0:
        raise TensorFormatError(f"{name}: shape {list(shape)} has a negative dimension", f"{name}.shape")
    count = math.prod(shape)
    if count == 0 and math.prod(dim for dim in shape if dim) > MAX_DIMENSION:
        raise TensorFormatError(f"{name}: shape {list(shape)} has no elements and its other dimensions "
                                f"multiply to over {MAX_DIMENSION}", f"{name}.shape")
    return count
