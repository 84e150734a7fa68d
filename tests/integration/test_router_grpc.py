"""A real router (grpc.aio on 127.0.0.1:0) in front of a scripted fake Scheduler gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest

from pagedserve.client import AsyncClient
from pagedserve.core.models import default_model_path
from protos.pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from router.config import RouterConfig, ServerConfig
from router.server import start_router
from router.tokenizer import Tokenizer, load_tokenizer

MAX_MODEL_LEN = 256
Script = Callable[[scheduler_pb2.SubmitRequest], list[scheduler_pb2.SeqOutput]]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@dataclass
class FakeScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Serves ``Connect``: per submitted request, streams canned outputs, one update per
    SeqOutput, ``delay_s`` apart. Records what it was sent and whether the router aborted a
    request. ``hold``: outputs start only once it is set. ``hang``: after its outputs a request
    never finishes, so only an abort (or the call's end) ends it, however slow the machine."""

    outputs: list[scheduler_pb2.SeqOutput] = field(default_factory=list)
    delay_s: float = 0.0
    error: grpc.StatusCode | None = None
    requests: list[scheduler_pb2.SubmitRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    num_calls: int = 0  # Connect calls opened
    drain: asyncio.Event = field(default_factory=asyncio.Event)  # set: tell open calls
    hold: asyncio.Event | None = None
    hang: bool = False

    async def Connect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.num_calls += 1
        updates: asyncio.Queue[scheduler_pb2.RequestUpdate] = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}

        async def run(request: scheduler_pb2.SubmitRequest) -> None:
            update = functools.partial(scheduler_pb2.RequestUpdate, request_id=request.request_id)
            if self.error is not None:
                updates.put_nowait(update(finished=True, status_code=self.error.value[0],
                                          status_message="queue full"))
                return
            try:
                if self.hold is not None:
                    await self.hold.wait()
                for output in self.outputs:
                    await asyncio.sleep(self.delay_s)
                    updates.put_nowait(update(outputs=[output]))
                if self.hang:
                    await asyncio.Event().wait()
                updates.put_nowait(update(finished=True))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        async def read() -> None:
            async for message in request_iterator:
                for request_id in message.abort_request_ids:
                    running.pop(request_id).cancel()
                for request in message.submits:
                    self.requests.append(request)
                    running[request.request_id] = asyncio.create_task(run(request))

        reader = asyncio.create_task(read())
        # Only calls open when the drain starts are told (a new call goes to the new scheduler).
        drained = asyncio.create_task(
            asyncio.Event().wait() if self.drain.is_set() else self.drain.wait())
        try:
            while True:
                got = asyncio.create_task(updates.get())
                await asyncio.wait([got, drained], return_when=asyncio.FIRST_COMPLETED)
                if drained.done() and not getattr(drained, "told", False):
                    drained.told = True  # type: ignore[attr-defined]
                    yield scheduler_pb2.ConnectResponse(draining=True)
                yield scheduler_pb2.ConnectResponse(updates=[await got])
        finally:
            reader.cancel()
            drained.cancel()
            for task in running.values():
                task.cancel()

    async def GetModelInfo(self, request, context):  # type: ignore[no-untyped-def]
        return scheduler_pb2.SchedulerModelInfo(
            model="smollm2", max_model_len=MAX_MODEL_LEN, vocab_size=49152, block_size=16,
            eos_token_ids=[2],
        )


@contextlib.asynccontextmanager
async def cluster(tokenizer: Tokenizer, fake: FakeScheduler, request_timeout_s: float = 30
                  ) -> AsyncIterator[tuple[AsyncClient, grpc.aio.Server]]:
    scheduler = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(fake, scheduler)
    scheduler_port = scheduler.add_insecure_port("127.0.0.1:0")
    await scheduler.start()
    cfg = RouterConfig(scheduler_address=f"127.0.0.1:{scheduler_port}",
                       server=ServerConfig(host="127.0.0.1", port=0, grace_s=0.1),
                       max_tokens_limit=128, request_timeout_s=request_timeout_s,
                       startup_timeout_s=5)
    router = await start_router(cfg, tokenizer)
    try:
        async with AsyncClient(f"127.0.0.1:{router.port}") as client:
            yield client, scheduler
    finally:
        await router.stop()
        await scheduler.stop(0)


def token_outputs(ids: list[int], finish: int = common_pb2.FINISH_REASON_UNSPECIFIED,
                  index: int = 0) -> list[scheduler_pb2.SeqOutput]:
    outputs = [scheduler_pb2.SeqOutput(index=index, token_ids=[i], num_prompt_tokens=3)
               for i in ids]
    if finish:
        outputs[-1].finish_reason = finish  # type: ignore[assignment]
        outputs[-1].num_cached_tokens = 2
    return outputs


def test_text_streams_and_final_message_has_usage(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" Hello, wörld 👋!") + [2]

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_STOP))
        async with cluster(tokenizer, fake) as (client, _):
            messages = [m async for m in client.generate("Hi there", max_tokens=20,
                                                         request_id="r1", timeout=10)]
            assert await client.generate_text("Hi there", max_tokens=20) == " Hello, wörld 👋!"
        assert "".join(m.text for m in messages) == " Hello, wörld 👋!"
        assert [i for m in messages for i in m.token_ids] == ids
        assert all(m.request_id == "r1" for m in messages)
        last = messages[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_STOP
        assert (last.usage.completion_tokens, last.usage.cached_tokens) == (len(ids), 2)
        sent = fake.requests[0]
        assert list(sent.prompt_token_ids) == tokenizer.encode("Hi there")
        assert sent.params.max_tokens == 20 and sent.params.temperature == 1.0
        # The client's 10 s deadline is passed downstream (what is left of it; grpc rounds it
        # up a little), not the router's own 30 s limit.
        assert 0 < fake.requests[0].timeout_s <= 10.5

    asyncio.run(main())


def test_concurrent_requests_share_one_scheduler_call(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" a b c d")

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_LENGTH),
                             delay_s=0.01)
        async with cluster(tokenizer, fake) as (client, _):
            texts = await asyncio.gather(*(
                client.generate_text(token_ids=[5, 6, i + 7], max_tokens=4) for i in range(16)))
        assert texts == [" a b c d"] * 16
        assert fake.num_calls == 1
        assert len(fake.requests) == 16

    asyncio.run(main())


def test_a_draining_scheduler_gets_no_new_requests_on_its_call(tokenizer: Tokenizer) -> None:
    async def main() -> None:
        ids = tokenizer.encode(" one two three four five six")
        fake = FakeScheduler(outputs=token_outputs(ids, common_pb2.FINISH_REASON_LENGTH),
                             hold=asyncio.Event())
        async with cluster(tokenizer, fake) as (client, _):
            first = asyncio.create_task(client.generate_text(token_ids=[5, 6], max_tokens=6))
            while not fake.requests:
                await asyncio.sleep(0.01)
            fake.drain.set()  # the scheduler starts shutting down: the open call is told ...
            assert fake.hold is not None
            fake.hold.set()  # ... before the first request's outputs, which follow on it
            assert await first == " one two three four five six"  # finished on the old call
            second = await client.generate_text(token_ids=[7, 8], max_tokens=6)
            assert second == " one two three four five six"
        assert fake.num_calls == 2  # the second request went on a new call

    asyncio.run(main())


def test_chat_prompt_goes_through_the_template(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs([2], common_pb2.FINISH_REASON_STOP))
        async with cluster(tokenizer, fake) as (client, _):
            await client.generate_text(messages=messages)
            tokenized = await client.tokenize(messages=messages)
            info = await client.model_info()
        assert list(fake.requests[0].prompt_token_ids) == tokenizer.encode_chat(messages)
        assert list(tokenized.token_ids) == tokenizer.encode_chat(messages)
        assert tokenized.tokens[0] == "<|im_start|>"
        assert fake.requests[0].request_id  # the router made one
        assert (info.model, info.max_model_len, info.has_chat_template) == (
            "smollm2", MAX_MODEL_LEN, True)

    asyncio.run(main())


def test_stop_string_cancels_the_upstream_submit(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four five six seven eight nine ten" * 5)

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids), delay_s=0.02, hang=True)
        async with cluster(tokenizer, fake) as (client, _):
            messages = [m async for m in client.generate("count", stop=["three"], timeout=10)]
            await asyncio.wait_for(fake.cancelled.wait(), 5)
        assert "".join(m.text for m in messages) == "one two "
        assert messages[-1].finish_reason == common_pb2.FINISH_REASON_STOP

    asyncio.run(main())


def test_client_cancel_propagates_to_the_scheduler(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" word" * 100)

    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(ids), delay_s=0.02, hang=True)
        async with cluster(tokenizer, fake) as (client, _):
            async for message in client.generate("go", max_tokens=120):
                assert message.text == " word"
                break  # closing the generator cancels the call
            await asyncio.wait_for(fake.cancelled.wait(), 5)

    asyncio.run(main())


def test_client_deadline_cancels_upstream_and_reports_deadline(tokenizer: Tokenizer) -> None:
    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(tokenizer.encode(" x" * 100)), delay_s=0.05,
                             hang=True)
        async with cluster(tokenizer, fake) as (client, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in client.generate("go", max_tokens=120, timeout=0.5):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.wait_for(fake.cancelled.wait(), 5)

    asyncio.run(main())


@pytest.mark.parametrize(("field", "kwargs"), [
    ("prompt.text", {"prompt": ""}),
    ("prompt.token_ids[1]", {"token_ids": [5, 49152]}),
    ("prompt.chat.messages", {"messages": []}),
    ("params.temperature", {"prompt": "x", "temperature": -1.0}),
    ("params.top_p", {"prompt": "x", "top_p": 0.0}),
    ("params.max_tokens", {"prompt": "x", "max_tokens": 129}),
    ("params.logprobs", {"prompt": "x", "logprobs": 21}),
    ("params.stop_token_ids[0]", {"prompt": "x", "stop_token_ids": [60000]}),
    ("prompt", {"prompt": "word " * 300}),
])
def test_bad_input_is_invalid_argument_naming_the_field(
    tokenizer: Tokenizer, field: str, kwargs: dict[str, object]
) -> None:
    async def main() -> None:
        fake = FakeScheduler()
        async with cluster(tokenizer, fake) as (client, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in client.generate(**kwargs):  # type: ignore[arg-type]
                    pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(f"{field}:")
        assert not fake.requests  # refused before the scheduler saw it

    asyncio.run(main())


def test_an_unknown_model_is_not_found_naming_the_field(tokenizer: Tokenizer) -> None:
    """NOT_FOUND, which the HTTP API maps to 404 (``router.openai_protocol.HTTP_STATUS``)."""
    async def main() -> None:
        fake = FakeScheduler()
        async with cluster(tokenizer, fake) as (client, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate_text("x", model="gpt-5")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (info.value.details() or "").startswith("model: 'gpt-5' is not served here")
        assert not fake.requests

    asyncio.run(main())


def test_router_timeout_ends_a_request_while_the_scheduler_is_unreachable(
        tokenizer: Tokenizer) -> None:
    """The router's own request timeout holds even when no scheduler answers: the request ends
    DEADLINE_EXCEEDED instead of waiting for a scheduler to come back. The client sets no
    deadline, so only the router's timeout can end it (``wait_for`` only guards against a hang)."""
    async def main() -> None:
        fake = FakeScheduler(outputs=token_outputs(tokenizer.encode(" x" * 5)))
        async with cluster(tokenizer, fake, request_timeout_s=0.5) as (client, scheduler):
            assert await client.generate_text("x") == " x" * 5  # the Connect call is open
            await scheduler.stop(0)  # ... and breaks; reconnecting waits for a scheduler
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(client.generate_text("x", timeout=None), 120)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "scheduler: deadline exceeded"  # the router's timer

    asyncio.run(main())


def test_upstream_resource_exhausted_is_passed_through(tokenizer: Tokenizer) -> None:
    async def main() -> None:
        fake = FakeScheduler(error=grpc.StatusCode.RESOURCE_EXHAUSTED)
        async with cluster(tokenizer, fake) as (client, _):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.generate_text("x")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in (info.value.details() or "")

    asyncio.run(main())
