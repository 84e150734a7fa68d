"""The two ways to reach a server: pagedserve's gRPC ``Generation`` API and an OpenAI-compatible
HTTP server (streaming ``/v1/completions``, server-sent events).

A backend sends one ``RequestSpec`` and returns its ``RequestResult``. Expected failures (a status
code, a refused connection, a deadline) come back as ``result.status``; a backend raises only on
programmer errors. Timestamps are ``time.perf_counter()`` values made relative to ``origin`` (the
run's start) so that every request in a run shares one clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from pagedserve.client import auth_metadata
from pagedserve.core.grpc_util import TlsConfig, aio_channel, client_ssl_context
from pagedserve.loadtest.datasets import RequestSpec
from pagedserve.loadtest.metrics import OK, RequestResult
from protos.pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc

try:  # optional: a native async client; urllib in a thread otherwise
    import httpx
except ImportError:  # pragma: no cover - depends on the environment
    httpx = None  # type: ignore[assignment]  # the optional module is None when absent

BACKEND_NAMES = ("grpc", "openai")


@dataclass(frozen=True)
class SamplingConfig:
    """What every request carries besides its prompt and ``max_tokens``."""

    temperature: float = 0.0
    model: str = ""


@dataclass(frozen=True)
class Credentials:
    """How the harness reaches a secured server: ``api_key`` (``authorization: Bearer``) and
    ``tls`` (CA and client certificate)."""

    api_key: str | None = None
    tls: TlsConfig | None = None


class Backend(Protocol):
    async def generate(
        self, spec: RequestSpec, timeout_s: float, origin: float
    ) -> RequestResult: ...

    async def close(self) -> None: ...


class _Recorder:
    """Collects one request's timings while its stream is read; ``finish`` builds the result."""

    def __init__(self, spec: RequestSpec, origin: float) -> None:
        self.spec = spec
        self.origin = origin
        self.sent = time.perf_counter()
        self.token_times: list[float] = []
        self.num_streamed_tokens = 0
        self.usage: tuple[int, int, int] | None = None  # prompt, completion, cached

    def on_tokens(self, num_tokens: int, now: float | None = None) -> None:
        self.token_times.append(time.perf_counter() if now is None else now)
        self.num_streamed_tokens += num_tokens

    def finish(self, status: str = OK, error: str = "") -> RequestResult:
        end = time.perf_counter()
        times = self.token_times
        prompt, completion, cached = self.usage or (0, 0, 0)
        return RequestResult(
            index=self.spec.index,
            status=status,
            start_s=self.sent - self.origin,
            ttft_s=times[0] - self.sent if times else None,
            e2e_s=end - self.sent if status == OK else None,
            itls_s=[b - a for a, b in itertools.pairwise(times)],
            num_prompt_tokens=prompt or (self.spec.num_prompt_tokens or 0),
            num_output_tokens=completion or self.num_streamed_tokens,
            num_cached_tokens=cached,
            error=error,
        )


# --- gRPC ----------------------------------------------------------------------------------------


class GrpcBackend:
    """Calls ``Generation.Generate`` on one shared channel; reads output 0 only (n is always 1)."""

    def __init__(self, target: str, sampling: SamplingConfig, run_id: str = "loadtest",
                 credentials: Credentials | None = None) -> None:
        credentials = credentials or Credentials()
        self._channel = aio_channel(target, credentials.tls)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        self._metadata = auth_metadata(credentials.api_key)
        self._sampling = sampling
        self._run_id = run_id

    def build_request(self, spec: RequestSpec) -> generation_pb2.GenerateRequest:
        params = common_pb2.SamplingParams(
            temperature=self._sampling.temperature, max_tokens=spec.max_tokens, ignore_eos=True
        )
        request = generation_pb2.GenerateRequest(
            request_id=f"{self._run_id}-{spec.index}", model=self._sampling.model, params=params
        )
        if spec.prompt_token_ids is not None:
            request.token_ids.ids.extend(spec.prompt_token_ids)
        else:
            request.text = spec.prompt_text or ""
        return request

    async def generate(self, spec: RequestSpec, timeout_s: float, origin: float) -> RequestResult:
        rec = _Recorder(spec, origin)
        call = self._stub.Generate(self.build_request(spec), timeout=timeout_s,
                                   metadata=self._metadata)
        try:
            async for msg in call:
                if msg.index != 0:
                    continue
                if msg.token_ids:
                    rec.on_tokens(len(msg.token_ids))
                if msg.HasField("usage"):
                    u = msg.usage
                    rec.usage = (u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        except grpc.aio.AioRpcError as exc:
            return rec.finish(exc.code().name, exc.details() or "")
        finally:
            call.cancel()  # no-op once finished; frees the server's work on cancel
        return rec.finish()

    async def close(self) -> None:
        await self._channel.close()


# --- OpenAI-compatible HTTP ----------------------------------------------------------------------


class _SseParser:
    """Feeds ``data:`` lines of a streaming ``/v1/completions`` response into a recorder."""

    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec
        self.done = False

    def feed(self, line: str, now: float | None = None) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments, event names
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        choices = chunk.get("choices") or []
        if choices and choices[0].get("text"):
            self.rec.on_tokens(1, now)
        usage = chunk.get("usage")
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            self.rec.usage = (
                usage.get("prompt_tokens") or 0,
                usage.get("completion_tokens") or 0,
                details.get("cached_tokens") or 0,
            )


class OpenAIBackend:
    """Streams ``POST {base_url}/v1/completions``; httpx when installed, else urllib in a thread
    (one daemon thread per in-flight request, timestamps taken in the thread as lines arrive)."""

    def __init__(self, base_url: str, sampling: SamplingConfig, use_httpx: bool | None = None,
                 credentials: Credentials | None = None):
        credentials = credentials or Credentials()
        self._url = base_url.rstrip("/") + "/v1/completions"
        self._base_url = base_url.rstrip("/")
        self._sampling = sampling
        self._use_httpx = (httpx is not None) if use_httpx is None else use_httpx
        if self._use_httpx and httpx is None:
            raise RuntimeError("httpx is not installed")
        self._ssl = client_ssl_context(credentials.tls)
        self._headers = {"Content-Type": "application/json"}
        if credentials.api_key:
            self._headers["Authorization"] = f"Bearer {credentials.api_key}"
        self._client = (httpx.AsyncClient(verify=self._ssl or True, headers=self._headers)
                        if self._use_httpx else None)
        self._model = sampling.model

    async def resolve_model(self) -> str:
        """The served model's id from ``/v1/models`` unless ``--model`` named one."""
        if not self._model:
            body = await asyncio.to_thread(_get_json, self._base_url + "/v1/models", 10.0,
                                           self._headers, self._ssl)
            self._model = body["data"][0]["id"]
        return self._model

    def build_body(self, spec: RequestSpec) -> dict[str, Any]:
        prompt: Any = list(spec.prompt_token_ids) if spec.prompt_token_ids else spec.prompt_text
        return {
            "model": self._model,
            "prompt": prompt,
            "max_tokens": spec.max_tokens,
            "temperature": self._sampling.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def generate(self, spec: RequestSpec, timeout_s: float, origin: float) -> RequestResult:
        await self.resolve_model()
        rec = _Recorder(spec, origin)
        parser = _SseParser(rec)
        if self._client is not None:
            status, error = await self._stream_httpx(spec, timeout_s, parser)
        else:
            status, error = await self._stream_urllib(spec, timeout_s, parser)
        return rec.finish(status, error)

    async def _stream_httpx(self, spec: RequestSpec, timeout_s: float, parser: _SseParser):
        assert self._client is not None and httpx is not None
        body = self.build_body(spec)
        try:
            async with self._client.stream("POST", self._url, json=body, timeout=timeout_s) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    return f"HTTP_{resp.status_code}", text[:200]
                async for line in resp.aiter_lines():
                    parser.feed(line)
        except httpx.TimeoutException as exc:
            return "DEADLINE_EXCEEDED", str(exc)
        except httpx.TransportError as exc:
            return "UNAVAILABLE", str(exc)
        return OK, ""

    async def _stream_urllib(self, spec: RequestSpec, timeout_s: float, parser: _SseParser):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        stop = threading.Event()
        args = (self._url, self.build_body(spec), timeout_s, stop, _threadsafe_put(loop, queue),
                self._headers, self._ssl)
        threading.Thread(target=_urllib_stream_lines, args=args, daemon=True).start()
        try:
            while True:
                kind, a, b = await queue.get()
                if kind == "line":
                    parser.feed(a, b)
                else:
                    return a, b  # ("end", status, error)
        finally:
            stop.set()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _threadsafe_put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Any:
    def put(item: tuple[str, Any, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop closed (run timed out); nobody is listening

    return put


def _urllib_stream_lines(
    url: str, body: dict, timeout_s: float, stop: threading.Event, put,
    headers: dict[str, str], context: ssl.SSLContext | None,
) -> None:
    """Runs in a thread: posts ``body``, puts each line with its arrival time, then the status."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
            for raw in resp:
                if stop.is_set():
                    return
                put(
                    (
                        "line",
                        raw.decode("utf-8", errors="replace").rstrip("\r\n"),
                        time.perf_counter(),
                    )
                )
        put(("end", OK, ""))
    except urllib.error.HTTPError as exc:
        put(("end", f"HTTP_{exc.code}", exc.read()[:200].decode(errors="replace")))
    except TimeoutError as exc:
        put(("end", "DEADLINE_EXCEEDED", str(exc)))
    except OSError as exc:  # refused, reset, DNS: URLError is an OSError
        put(("end", "UNAVAILABLE", str(exc)))
    except Exception as exc:  # noqa: BLE001 - e.g. IncompleteRead: never leave the reader waiting
        put(("end", "ERROR", repr(exc)))


def _get_json(url: str, timeout_s: float, headers: dict[str, str],
              context: ssl.SSLContext | None) -> Any:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
        return json.loads(resp.read())


def make_backend(
    name: str, target: str, base_url: str, sampling: SamplingConfig, run_id: str = "loadtest",
    credentials: Credentials | None = None,
) -> Backend:
    """``run_id`` prefixes gRPC request ids (``{run_id}-{index}``) so server logs can be matched."""
    if name == "grpc":
        return GrpcBackend(target, sampling, run_id, credentials)
    if name == "openai":
        if not base_url:
            raise ValueError("--backend openai needs --base-url http://HOST:PORT")
        return OpenAIBackend(base_url, sampling, credentials=credentials)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
