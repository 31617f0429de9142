"""StreamColumns messages across model versions: each entry runs on the engine of the version its session began
on. With one version loaded (the common case) the message is that engine's whole; otherwise it is split by engine,
each part runs as one columnar call, and the parts' answers are put back in the message's order."""

import asyncio
import copy
import re

import numpy as np

from server.engine import ColumnsAnswer, Engine, EngineError, InvalidInput
from server.engine.columnar import check_lines_up

_INDEXED_FIELD = re.compile(r"^(\w+)\[(\d+)\]")


async def step_split(parts: dict[Engine, list[int]], refused: dict[int, Exception], session_ids: list[str],
                     seqs: list[int], inputs: np.ndarray, owner: str) -> asyncio.Future:
    """Runs entries `parts[engine]` on each engine; `refused` holds the entries no engine takes, with why.
    Returns one future of the whole message's ColumnsAnswer, like Engine.step_columns: a part that is refused or
    fails answers each of its entries with that error, and the other parts' answers stand. A message whose parts
    do not line up is refused whole (InvalidInput) before any part is queued, as by one engine."""
    check_lines_up(len(session_ids), seqs, inputs, None)  # each engine checks its own input size
    n, steps = len(session_ids), inputs.shape[1]
    output_size = _output_size(parts, refused, n)
    errors = dict(refused)
    running = []
    try:
        for engine, rows in parts.items():
            if engine.describe().metadata.output_size != output_size:
                errors.update((i, _mixed_sizes(i, session_ids[i])) for i in rows)
                continue
            try:
                answer = await engine.step_columns([session_ids[i] for i in rows],
                                                   [seqs[i] for i in rows] if seqs else [], inputs[rows], owner=owner)
            except EngineError as refusal:  # the part's inputs do not fit its model: each of its entries is refused
                errors.update((i, _renumbered(refusal, rows)) for i in rows)
                continue
            running.append((rows, answer))
    except BaseException:
        for _, future in running:  # accepted parts run on; nobody waits for their answers any more
            future.add_done_callback(_retrieved)
        raise
    return asyncio.ensure_future(_joined(running, errors, n, steps, output_size, seqs))


async def _joined(running: list, errors: dict, n: int, steps: int, output_size: int, seqs: list[int]
                  ) -> ColumnsAnswer:
    outputs = np.zeros((n, steps, output_size), np.float32)
    numbers = list(seqs) if seqs else [0] * n
    answers = await asyncio.gather(*(future for _, future in running), return_exceptions=True)
    for (rows, _), part in zip(running, answers):
        if isinstance(part, BaseException):
            if not isinstance(part, Exception):
                raise part
            errors.update((i, part) for i in rows)  # that part's whole flight failed; the others stand
            continue
        outputs[rows] = part.outputs
        for k, i in enumerate(rows):
            numbers[i] = part.sequence_numbers[k]
        errors.update((rows[k], _renumbered(error, rows)) for k, error in part.errors.items())
    return ColumnsAnswer(outputs, numbers, errors)


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _output_size(parts: dict[Engine, list[int]], refused: dict, n: int) -> int:
    """The answer's output size: that of the engine of the message's first entry that has one."""
    first = min(((rows[0], engine) for engine, rows in parts.items()), default=None, key=lambda pair: pair[0])
    return 0 if first is None else first[1].describe().metadata.output_size


def _renumbered(error: Exception, rows: list[int]) -> Exception:
    """A part's refusal names its entry's place in the part (`inputs[2]`): name its place in the message."""
    if isinstance(error, InvalidInput) and error.field and (match := _INDEXED_FIELD.match(error.field)):
        error = copy.copy(error)  # one refusal may stand for several entries: each names its own place
        error.field = f"{match[1]}[{rows[int(match[2])]}]{error.field[match.end():]}"
    return error


def _mixed_sizes(i: int, session_id: str) -> InvalidInput:
    return InvalidInput(f"entry {i}'s session runs on a model whose outputs differ in size from this message's first "
                        "entry's: send each model's sessions in StreamColumns messages of their own",
                        f"session_ids[{i}]")
