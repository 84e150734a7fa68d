"""One request must never take down the others on its worker (issue 15).

Odd but well-typed parameters (float extremes, a huge negative length penalty with beams) are
sent through a real cluster beside eight greedy bystanders on the same worker: every bystander
completes token-exact against Hugging Face, each odd request ends alone (OK, or a clear
INVALID_ARGUMENT naming its field), the worker stays healthy and every block is freed."""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.client import AsyncClient
from pagedserve.core.errors import PagedServeError
from pagedserve.core.sampling import make_sampling_params, resolve_sampling_params
from protos.pagedserve.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.engine import Engine
from scheduler.worker_handle import InProcessWorkerHandle
from tests.support.cluster import ClusterThread
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_factory import cpu_worker, cpu_worker_config

transformers = pytest.importorskip("transformers")

F32_MAX = 3.4e38

# Each passed validation before issue 15 and made the step raise for the whole worker.
ODD_PARAMS: list[dict[str, object]] = [
    {"beam_width": 2, "length_penalty": -2000.0, "max_tokens": 4},
    {"beam_width": 2, "length_penalty": F32_MAX, "max_tokens": 4},
    {"beam_width": 2, "length_penalty": -F32_MAX, "max_tokens": 4},
    {"temperature": F32_MAX, "max_tokens": 6},
    {"temperature": 1e-38, "max_tokens": 6},
    {"temperature": F32_MAX, "best_of": 2, "max_tokens": 4},
    {"temperature": 1.0, "best_of": 3, "n": 2, "length_penalty": F32_MAX, "max_tokens": 4},
    {"temperature": 1.0, "repetition_penalty": F32_MAX, "max_tokens": 6},
    {"temperature": 1.0, "repetition_penalty": 1e-38, "max_tokens": 6},
    {"temperature": 0.5, "top_k": 2**31 - 1, "min_p": 1.0, "top_p": 1e-38, "max_tokens": 6},
]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def cluster(model_dir):
    c = ClusterThread([cpu_worker_config(model_dir, num_gpu_blocks=256)], SchedulerConfig())
    yield c
    c.stop()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


async def _run(client: AsyncClient, prompt: list[int], started: asyncio.Event | None,
               **params: object) -> tuple[list[int], grpc.StatusCode, str]:
    """(tokens of output 0, final status, details): never raises for a status."""
    tokens: list[int] = []
    try:
        async for msg in client.generate(token_ids=prompt, timeout=300, **params):
            if msg.index == 0:
                tokens.extend(msg.token_ids)
            if started is not None:
                started.set()
    except grpc.aio.AioRpcError as exc:
        return tokens, exc.code(), exc.details() or ""
    return tokens, grpc.StatusCode.OK, ""


def run_beside_bystanders(cluster: ClusterThread, odd: list[dict[str, object]],
                          prompts: list[list[int]], num_bystander_tokens: int):
    """Starts the greedy bystanders, sends the odd requests once every bystander is streaming,
    and returns (bystander results, odd results)."""
    async def main():
        async with AsyncClient(cluster.cluster.router_address) as client:
            started = [asyncio.Event() for _ in prompts]
            bystanders = [asyncio.create_task(_run(
                client, p, ev, max_tokens=num_bystander_tokens, temperature=0.0,
                ignore_eos=True)) for p, ev in zip(prompts, started, strict=True)]
            await asyncio.gather(*(ev.wait() for ev in started))
            odd_results = await asyncio.gather(*(
                _run(client, [5, 6, 7, 8, 9], None, **params) for params in odd))
            return await asyncio.gather(*bystanders), odd_results
    return asyncio.run(main())


def _bystander_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(4, 30))] for _ in range(8)]


def assert_ended_alone(results, cases) -> None:
    for (tokens, code, details), params in zip(results, cases, strict=True):
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (params, code,
                                                                                details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "params." in details, (params, details)  # names the field
        else:
            assert tokens, params


def test_odd_parameters_fail_alone_and_bystanders_finish_token_exact(cluster, hf_model):
    prompts = _bystander_prompts(0)
    bystanders, odd = run_beside_bystanders(cluster, ODD_PARAMS, prompts, 40)
    assert_ended_alone(odd, ODD_PARAMS)
    for prompt, (tokens, code, details) in zip(prompts, bystanders, strict=True):
        assert code == grpc.StatusCode.OK, details
        assert tokens == hf_greedy(hf_model, prompt, 40)
    assert all(w.healthy for w in cluster.stats().workers)
    assert cluster.all_blocks_free(), cluster.stats()


# Below validation: resolved params with the extremes written in afterwards, as a request that
# bypassed the checks (or a future unchecked field) would arrive. The sampler and beam scoring
# keep them in their rows; a step the worker refuses fails only the request it introduced.
BYPASSING: list[tuple[dict[str, object], dict[str, object]]] = [
    ({"beam_width": 2, "max_tokens": 4}, {"length_penalty": -2000.0}),
    ({"beam_width": 2, "max_tokens": 4}, {"length_penalty": F32_MAX}),
    ({"temperature": 1.0, "max_tokens": 6}, {"temperature": F32_MAX}),
    ({"temperature": 1.0, "max_tokens": 6}, {"temperature": 1e-38}),
    ({"temperature": 1.0, "best_of": 2, "max_tokens": 4}, {"temperature": F32_MAX}),
    ({"temperature": 1.0, "max_tokens": 6}, {"repetition_penalty": F32_MAX}),
    ({"temperature": 1.0, "max_tokens": 6}, {"repetition_penalty": 1e-38}),
]
REFUSED = ({"temperature": 0.0, "max_tokens": 6, "min_tokens": 2}, {"stop_token_ids": [600]})


def _bypassing(valid: dict[str, object], extremes: dict[str, object]):
    params = resolve_sampling_params(make_sampling_params(**valid), num_prompt_tokens=5,
                                     max_model_len=512, max_tokens_limit=512)
    for name, value in extremes.items():
        if name == "stop_token_ids":
            params.stop_token_ids.extend(value)  # type: ignore[arg-type]
        else:
            setattr(params, name, value)
    return params


async def _engine_run(engine: Engine, request_id: str, prompt: list[int], params):
    tokens: list[int] = []
    try:
        async for response in engine.submit(request_id, prompt, params):
            tokens.extend(t for o in response.outputs if o.index == 0 for t in o.token_ids)
    except PagedServeError as exc:
        return tokens, exc
    return tokens, None


def test_below_validation_odd_rows_stay_in_their_row_and_a_refused_step_fails_one(
        model_dir, hf_model):
    prompts = _bystander_prompts(1)
    greedy = resolve_sampling_params(
        make_sampling_params(max_tokens=40, temperature=0.0, ignore_eos=True),
        num_prompt_tokens=30, max_model_len=512, max_tokens_limit=512)

    async def main():
        worker = cpu_worker(model_dir, num_gpu_blocks=256)
        engine = Engine(SchedulerConfig(), [InProcessWorkerHandle(worker)])
        await engine.start()
        try:
            bystanders = [asyncio.create_task(_engine_run(engine, f"by-{i}", p, greedy))
                          for i, p in enumerate(prompts)]
            await asyncio.sleep(0)
            odd = await asyncio.gather(*(
                _engine_run(engine, f"odd-{i}", [5, 6, 7, 8, 9], _bypassing(*case))
                for i, case in enumerate([*BYPASSING, REFUSED])))
            results = await asyncio.gather(*bystanders)
            healthy = [ws.healthy for ws in engine.workers]
            free = [(ws.kv.gpu.num_free_blocks, ws.kv.gpu.num_blocks) for ws in engine.workers]
            return results, odd, healthy, free
        finally:
            await engine.stop()

    results, odd, healthy, free = asyncio.run(main())
    for (tokens, error), case in zip(odd[:-1], BYPASSING, strict=True):
        assert error is None and tokens, (case, error)
    tokens, error = odd[-1]
    assert error is not None and error.code == "INVALID_ARGUMENT"
    assert "stop_token_ids" in str(error)
    for prompt, (tokens, error) in zip(prompts, results, strict=True):
        assert error is None
        assert tokens == hf_greedy(hf_model, prompt, 40)
    assert all(healthy)
    assert all(n_free == n for n_free, n in free)


# Any value of every field (float extremes, NaN and infinities, int32 extremes, unicode, unset),
# and requests that are well-formed but for float extremes, which are the dangerous ones.
_F32_EXTREMES = [3.4e38, -3.4e38, 1e-38, -1e-38, -2000.0, 2000.0, math.inf, -math.inf, math.nan]
_F32 = st.one_of(st.sampled_from(_F32_EXTREMES), st.floats(width=32))
_I32 = st.one_of(st.integers(-3, 8), st.sampled_from([-2**31, 2**31 - 1, 64, 65, 511, 513]))
_PARAM_FIELDS = {
    "temperature": _F32, "top_p": _F32, "top_k": _I32, "min_p": _F32,
    "repetition_penalty": _F32, "presence_penalty": _F32, "frequency_penalty": _F32,
    "seed": st.integers(0, 2**64 - 1), "max_tokens": _I32, "min_tokens": _I32,
    "stop": st.lists(st.text(max_size=260), max_size=18),
    "stop_token_ids": st.lists(st.integers(-2**31, 2**31 - 1), max_size=4),
    "ignore_eos": st.booleans(), "logprobs": _I32, "n": _I32, "best_of": _I32,
    "beam_width": _I32, "length_penalty": _F32, "early_stopping": st.booleans(),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
}
_EXTREME = st.sampled_from(_F32_EXTREMES)
_WELL_FORMED_BUT_EXTREME = st.one_of(
    st.fixed_dictionaries({"beam_width": st.integers(2, 3), "length_penalty": _EXTREME,
                           "max_tokens": st.integers(1, 6)},
                          optional={"early_stopping": st.booleans(), "n": st.just(1)}),
    st.fixed_dictionaries({"temperature": _EXTREME, "max_tokens": st.integers(1, 6)},
                          optional={"best_of": st.integers(1, 3), "seed": st.integers(0, 9),
                                    "length_penalty": _EXTREME, "logprobs": st.integers(0, 3),
                                    "repetition_penalty": _EXTREME}))
_PROMPTS = st.one_of(
    st.none(), st.text(max_size=120).map(lambda t: {"text": t}),
    st.lists(st.integers(-2**31, 2**31 - 1), max_size=40).map(
        lambda ids: {"token_ids": generation_pb2.TokenIds(ids=ids)}))
_GOOD_PROMPTS = st.one_of(
    st.text(min_size=1, max_size=60).map(lambda t: {"text": t}),
    st.lists(st.integers(3, 511), min_size=1, max_size=40).map(
        lambda ids: {"token_ids": generation_pb2.TokenIds(ids=ids)}))
_REQUEST_IDS = st.one_of(st.just(""), st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), max_size=140))


def _generate_request(prompt, params, request_id, model) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(request_id=request_id, model=model,
                                          params=common_pb2.SamplingParams(**params),
                                          **(prompt or {}))


_REQUESTS = st.one_of(
    st.builds(_generate_request, _PROMPTS, st.fixed_dictionaries({}, optional=_PARAM_FIELDS),
              _REQUEST_IDS, st.sampled_from(["", "not-this-model"])),
    st.builds(_generate_request, _GOOD_PROMPTS, _WELL_FORMED_BUT_EXTREME, st.just(""),
              st.just("")))
# How a hostile request may end: served, or refused with a clear reason. Never a worker down.
_CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.RESOURCE_EXHAUSTED}
BYSTANDER = [40, 41, 42, 43, 44, 45]


async def _raw(stub, request: generation_pb2.GenerateRequest):
    try:
        async for _ in stub.Generate(request, timeout=120):
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def bystander_tokens(cluster, hf_model) -> list[int]:
    return hf_greedy(hf_model, BYSTANDER, 16)


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=_REQUESTS)
def test_generated_requests_never_take_the_worker_down(cluster, bystander_tokens, request):
    async def main():
        async with AsyncClient(cluster.cluster.router_address) as client:
            started = asyncio.Event()
            bystander = asyncio.create_task(_run(client, BYSTANDER, started, max_tokens=16,
                                                 temperature=0.0, ignore_eos=True))
            await started.wait()
            async with grpc.aio.insecure_channel(cluster.cluster.router_address) as channel:
                ended = await _raw(generation_pb2_grpc.GenerationStub(channel), request)
            return ended, await bystander

    (code, details), (tokens, by_code, by_details) = asyncio.run(main())
    assert code in _CLEAR, (request, code, details)
    assert code == grpc.StatusCode.OK or details, (request, code)
    assert by_code == grpc.StatusCode.OK, by_details
    assert tokens == bystander_tokens
    assert all(w.healthy for w in cluster.stats().workers)
    assert cluster.all_blocks_free(), cluster.stats()
