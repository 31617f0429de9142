"""read_ahead, the pipelining under every streaming servicer: order, the read-ahead window, draining, failures."""

import asyncio
import gc

import pytest

from server.engine import Draining
from server.transport.streams import read_ahead

pytestmark = pytest.mark.unit


class ClientStream:
    """A request stream the test feeds by hand; it stays open (like a client that has not half-closed) until
    `close()`, and remembers how many requests were read from it."""

    def __init__(self, *requests):
        self._queue: asyncio.Queue = asyncio.Queue()
        self.read = 0
        for request in requests:
            self.send(request)

    def send(self, request) -> None:
        self._queue.put_nowait(request)

    def close(self) -> None:
        self._queue.put_nowait(StopAsyncIteration)

    def fail(self, error: Exception) -> None:
        self._queue.put_nowait(error)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is StopAsyncIteration:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        self.read += 1
        return item


class Submitter:
    """`submit` as the servicers use it: queues the request's work and returns at once (here, its answer)."""

    def __init__(self):
        self.submitted = []

    async def __call__(self, request):
        self.submitted.append(request)
        return f"answer {request}"


async def take_all(answers, into: list) -> None:
    """Appends every answer until the stream ends; one that never ends fails the test instead of hanging it."""
    async with asyncio.timeout(60):
        async for answer in answers:
            into.append(answer)


async def settle():
    """Lets every task that can make progress without outside input run until it waits."""
    for _ in range(100):
        await asyncio.sleep(0)


async def test_answers_come_in_request_order_and_the_stream_ends_when_the_client_closes():
    stream, submit = ClientStream(*range(10)), Submitter()
    stream.close()
    answers = []
    await take_all(read_ahead(stream, submit, window=3, draining=asyncio.Event()), answers)
    assert answers == [f"answer {i}" for i in range(10)]
    assert submit.submitted == list(range(10))


async def test_the_window_bounds_how_many_requests_are_submitted_before_their_answers_are_taken():
    stream, submit = ClientStream(*range(20)), Submitter()
    answers = read_ahead(stream, submit, window=4, draining=asyncio.Event())
    try:
        assert await anext(answers) == "answer 0"
        await settle()
        assert submit.submitted == [0, 1, 2, 3]  # the answer being handed out still holds its slot
        assert stream.read <= 5  # at most one more read, waiting for a slot
        assert await anext(answers) == "answer 1"  # frees the first slot
        await settle()
        assert submit.submitted == [0, 1, 2, 3, 4]
    finally:
        await answers.aclose()


async def test_draining_stops_reading_yields_what_was_taken_then_ends_with_draining():
    stream, submit, draining = ClientStream(0, 1, 2), Submitter(), asyncio.Event()
    answers = read_ahead(stream, submit, window=8, draining=draining)
    assert await anext(answers) == "answer 0"
    await settle()
    draining.set()
    await settle()
    stream.send(3)  # sent after the drain began: never read
    rest = []
    with pytest.raises(Draining, match="shutting down"):
        await take_all(answers, rest)
    assert rest == ["answer 1", "answer 2"]
    assert submit.submitted == [0, 1, 2]
    assert stream.read == 3


async def test_a_failing_request_stream_is_raised_after_the_answers_before_it():
    stream, submit = ClientStream(0, 1), Submitter()
    stream.fail(ValueError("bytes that are not a request"))
    answers = []
    with pytest.raises(ValueError, match="bytes that are not a request"):
        await take_all(read_ahead(stream, submit, window=4, draining=asyncio.Event()), answers)
    assert answers == ["answer 0", "answer 1"]


async def test_leaving_the_stream_early_stops_reading_it():
    stream, submit = ClientStream(0), Submitter()
    answers = read_ahead(stream, submit, window=4, draining=asyncio.Event())
    assert await anext(answers) == "answer 0"
    await answers.aclose()  # the handler ended (client cancelled, error): the reader must not live on
    stream.send(1)
    await settle()
    assert (stream.read, submit.submitted) == (1, [0])


async def test_a_waiting_consumer_gets_an_item_once_the_answer_it_awaits_is_done():
    loop = asyncio.get_running_loop()
    answers = {1: loop.create_future(), 2: loop.create_future()}

    async def submit(request):
        return request, answers[request]

    stream, taken = ClientStream(1), []
    pipeline = read_ahead(stream, submit, 4, asyncio.Event(), awaited=lambda item: item[1])
    consumer = asyncio.create_task(take_all(pipeline, taken))
    while stream.read < 1:
        await asyncio.sleep(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert taken == []  # read and submitted, but its answer is not there yet
    answers[1].set_result("one")
    stream.send(2)
    while len(taken) < 1:
        await asyncio.sleep(0)
    assert taken[0][0] == 1 and taken[0][1].result() == "one"
    answers[2].set_exception(RuntimeError("refused"))  # a failed answer hands its item out too
    while len(taken) < 2:
        await asyncio.sleep(0)
    stream.close()
    await consumer
    assert [request for request, _ in taken] == [1, 2] and isinstance(taken[1][1].exception(), RuntimeError)


async def test_a_stream_that_ends_while_its_consumer_waits_leaves_the_answer_running_and_its_error_retrieved():
    loop = asyncio.get_running_loop()
    answers, logged = {1: loop.create_future()}, []
    loop.set_exception_handler(lambda _, context: logged.append(context["message"]))

    async def submit(request):
        return request, answers[request]

    consumer = asyncio.create_task(take_all(read_ahead(ClientStream(1), submit, 4, asyncio.Event(),
                                                       awaited=lambda item: item[1]), []))
    await settle()
    consumer.cancel()  # the client went away while its request ran
    await settle()
    answer = answers.pop(1)
    assert not answer.cancelled()  # the consumer waited on its own future: the request runs on
    answer.set_exception(RuntimeError("the model failed"))
    del answer, consumer  # the cancelled task's traceback holds the generator's frame, and so the answer
    await settle()
    gc.collect()
    assert logged == []


async def test_a_stream_that_ends_early_cancels_the_cancellable_answers_and_leaves_the_others_running():
    loop = asyncio.get_running_loop()
    answers = {request: loop.create_future() for request in (1, 2, 3)}

    async def submit(request):
        return request, answers[request]

    consumer = asyncio.create_task(take_all(read_ahead(ClientStream(1, 2, 3), submit, 4, asyncio.Event(),
                                                       awaited=lambda item: item[1],
                                                       cancellable=lambda item: item[0] != 2), []))
    await settle()
    consumer.cancel()  # the client went away while the head request (1) ran
    await settle()
    assert [answers[request].cancelled() for request in (1, 2, 3)] == [True, False, True]
