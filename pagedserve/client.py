"""Python client for the public ``Generation`` service.

    async with AsyncClient("127.0.0.1:50051") as client:
        print(await client.generate_text("Once upon a time", max_tokens=32, temperature=0))
        async for delta in client.generate(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="")

Breaking out of ``generate`` cancels the call, which aborts the request in the server.
``tls`` (``pagedserve.core.grpc_util.TlsConfig``: the CA that verifies the router, and a client
certificate when the router requires one) and ``api_key`` (sent as ``authorization: Bearer``)
reach a secured router.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self

from pagedserve.core.grpc_util import TlsConfig, aio_channel
from pagedserve.core.sampling import make_sampling_params
from protos.pagedserve.v1 import generation_pb2, generation_pb2_grpc


class AsyncClient:
    """Owns one channel to a router. Use as ``async with``; ``close`` releases the channel."""

    def __init__(self, address: str, *, tls: TlsConfig | None = None,
                 api_key: str | None = None) -> None:
        self.address = address
        self._channel = aio_channel(address, tls)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = auth_metadata(api_key)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str = "",
        model: str = "",
        cache_salt: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Streams the response messages. Exactly one of ``prompt``, ``messages``, ``token_ids``;
        ``sampling`` holds ``SamplingParams`` fields (``max_tokens=16, stop=["\\n"]``).
        ``cache_salt``: share prefix-cache blocks only with requests that send the same salt."""
        request = _generate_request(prompt, messages, token_ids, request_id, model, sampling)
        request.cache_salt = cache_salt
        call = self._stub.Generate(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate_text(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> str:
        """The full text of output 0."""
        parts = []
        async for response in self.generate(prompt, messages=messages, token_ids=token_ids,
                                            timeout=timeout, **sampling):
            if response.index == 0:
                parts.append(response.text)
        return "".join(parts)

    async def model_info(self, timeout: float | None = None) -> generation_pb2.ModelInfo:
        return await self._stub.GetModelInfo(generation_pb2.ModelInfoRequest(), timeout=timeout,
                                             metadata=self._metadata)

    async def tokenize(
        self, text: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
        timeout: float | None = None,
    ) -> generation_pb2.TokenizeResponse:
        if (text is None) == (messages is None):
            raise ValueError("pass exactly one of text, messages")
        request = (generation_pb2.TokenizeRequest(text=text) if text is not None
                   else generation_pb2.TokenizeRequest(chat=_chat(messages or [])))
        return await self._stub.Tokenize(request, timeout=timeout, metadata=self._metadata)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries ``api_key`` (None without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def _chat(messages: Sequence[dict[str, str]]) -> generation_pb2.ChatMessages:
    return generation_pb2.ChatMessages(messages=[
        generation_pb2.ChatMessage(role=m["role"], content=m.get("content", "")) for m in messages
    ])


def _generate_request(
    prompt: str | None, messages: Sequence[dict[str, str]] | None,
    token_ids: Sequence[int] | None, request_id: str, model: str, sampling: dict[str, Any],
) -> generation_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("pass exactly one of prompt, messages, token_ids")
    request = generation_pb2.GenerateRequest(
        request_id=request_id, model=model, params=make_sampling_params(**sampling)
    )
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.CopyFrom(_chat(messages))
    else:
        request.token_ids.ids.extend(token_ids or [])
    return request
