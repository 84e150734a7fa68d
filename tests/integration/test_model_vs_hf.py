"""Our paged Llama matches Hugging Face ``LlamaForCausalLM`` (the oracle), token for token.

Tiny random Llama (safetensors): prefill logits through the paged cache with shuffled block tables
equal HF logits; greedy generation through ``Worker.step`` (batched, chunked prefill, decodes)
equals HF ``generate``. SmolLM2-135M from the packaged GGUF (Q/K un-permuted, dequantized): the
first 32 greedy tokens equal HF's GGUF load.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import CPU_ISAS
from tests.support.tiny_llama import tiny_llama_dir
from tests.support.worker_driver import StepDriver
from tests.support.worker_factory import cpu_worker
from worker.attention.torch_backend import TorchAttentionBackend
from worker.kernels import cpu_ops
from worker.model_runner import ModelRunner, ScheduledWork
from worker.models.execution import (
    CodedEmbedding,
    ExecutionPath,
    FusedCpuStackExecution,
    PackedLinear,
)
from worker.models.loader import load_model
from worker.sampler import ResolvedParams, Sampler
from worker.sequence_state import SequenceState

transformers = pytest.importorskip("transformers")

TINY_VARIANTS = {
    "untied": {},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
    },
    "llama_attention_bias": {"attention_bias": True},
    "qwen2_qkv_bias": {"architecture": "qwen2"},
}


def _hf(path: object) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_greedy(hf: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by explicit argmax over full forwards (no EOS stop, no generate
    config surprises): exactly what ``generate(do_sample=False)`` computes."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=num_tokens, min_new_tokens=0, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("kernels", [*CPU_ISAS, "torch_ops"])
def test_prefill_logits_through_shuffled_paged_cache_match_hf(
    variant: str, block_size: int, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once per fused-kernel variant this CPU runs (avx512, avx2, portable), and ``torch_ops``:
    the fused CPU kernels turned off (packed matmuls, RMSNorm, RoPE, SwiGLU), the path of
    machines where they cannot be built."""
    if kernels == "torch_ops":
        monkeypatch.setattr(cpu_ops, "load", lambda isa=None: None)
    else:
        monkeypatch.setenv(cpu_ops.ENV_ISA, kernels)
    path = tiny_llama_dir(**TINY_VARIANTS[variant])
    model, config = load_model(path, torch.float32, "cpu", TorchAttentionBackend())
    runner = ModelRunner(model, Sampler(config.eos_token_ids), block_size, torch.device("cpu"))
    run = runner.execution
    assert run.path is (ExecutionPath.TORCH if kernels == "torch_ops"
                        else ExecutionPath.FUSED_CPU_STACK)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == (kernels != "torch_ops")
    assert all(m.kernels.isa == kernels for m in packed)
    hf = _hf(path)
    prompts = _prompts(1, [13, 5, 21], config.vocab_size)
    num_blocks = 32
    caches = [(torch.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim),
               torch.zeros(num_blocks, block_size, config.num_kv_heads, config.head_dim))
              for _ in range(config.num_layers)]
    free = list(np.random.default_rng(block_size).permutation(num_blocks))
    work = []
    for i, prompt in enumerate(prompts):
        seq = SequenceState(i, prompt, len(prompt), ResolvedParams(temperature=0.0))
        seq.block_table = [int(free.pop()) for _ in range(-(-len(prompt) // block_size))]
        work.append(ScheduledWork(seq, 0, len(prompt), sample=True))
    inputs = runner.prepare(work)
    with torch.inference_mode():
        hidden = run.forward(inputs.input_ids, inputs.positions, caches, inputs.meta)
        logits = run.compute_logits(hidden)
    offset = 0
    for prompt in prompts:
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0]
        got = logits[offset : offset + len(prompt)]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        offset += len(prompt)


@pytest.mark.parametrize("block_size", [4, 16])
def test_greedy_worker_steps_match_hf_generate(block_size: int, cpu_isa: str) -> None:
    """Batch of 3, first prefill chunk split over two steps, then 20 decode steps."""
    path = tiny_llama_dir()
    hf = _hf(path)
    worker = cpu_worker(path, block_size=block_size, num_gpu_blocks=128)
    prompts = _prompts(2, [7, 12, 3], worker.model_config.vocab_size)
    driver = StepDriver(worker.step, num_blocks=128, block_size=block_size, seed=block_size)
    seqs = driver.generate(prompts, max_new_tokens=20, first_chunk=2)
    assert any(not s for r in driver.requests for s in r.scheduled.sample), "no chunked prefill"
    for prompt, seq in zip(prompts, seqs, strict=True):
        assert seq.outputs == _hf_greedy(hf, prompt, 20)
    assert worker.seqs == {}, "finished sequences must be dropped"


def test_greedy_single_sequence_decode_matches_hf(cpu_isa: str) -> None:
    path = tiny_llama_dir(tie_word_embeddings=True)
    hf = _hf(path)
    worker = cpu_worker(path, block_size=4)
    prompt = _prompts(3, [9], worker.model_config.vocab_size)[0]
    seq = StepDriver(worker.step, 64, 4).generate([prompt], max_new_tokens=20)[0]
    assert seq.outputs == _hf_greedy(hf, prompt, 20)


# --------------------------------------------------------------------------------- SmolLM2 GGUF

# Token ids from SmolLM2's own tokenizer (kept literal: loading it costs seconds per session).
SMOLLM2_PROMPTS = {
    # "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    "chat": [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    "The quick brown fox": [504, 2365, 6354, 16438],
    "def fibonacci(n):": [1604, 3987, 46477, 24, 94, 727],
}
SMOLLM2_TOKENS = 32
TIE_GAP = 1e-3  # fp32 logits this close are a rounding tie, not a disagreement


@pytest.fixture(scope="module")
def smollm2_hf() -> torch.nn.Module:
    from pagedserve.core.models import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module", params=CPU_ISAS or ["torch_ops"])
def smollm2_outputs(request: pytest.FixtureRequest) -> dict[str, object]:
    """SmolLM2's greedy outputs through ``Worker.step``, once per fused-kernel variant."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param != "torch_ops":
            mp.setenv(cpu_ops.ENV_ISA, request.param)
        worker = cpu_worker(None, block_size=16, num_gpu_blocks=32)
        prompts = list(SMOLLM2_PROMPTS.values())
        driver = StepDriver(worker.step, 32, 16, seed=7)
        seqs = driver.generate(prompts, max_new_tokens=SMOLLM2_TOKENS)
    return dict(zip(SMOLLM2_PROMPTS, seqs, strict=True))


def _assert_greedy_matches_hf(name, prompt, tokens, logprobs, hf) -> None:
    theirs = _hf_greedy(hf, prompt, SMOLLM2_TOKENS)
    # Either side may be the shorter one; only the common prefix is compared here.
    pairs = zip(tokens, theirs, strict=False)
    mismatch = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    if mismatch is None:
        assert len(tokens) >= SMOLLM2_TOKENS
        return
    # Sequences diverged at `mismatch`. That is acceptable ONLY if HF's own top-2 logits at that
    # position are a tie within fp32 rounding; then the teacher-forced log-prob of our token must
    # still agree with HF's. Anything else is a real bug.
    context = torch.tensor([prompt + tokens[:mismatch]])
    with torch.no_grad():
        logits = hf(context).logits[0, -1].float()
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) < TIE_GAP, (
        f"diverged at token {mismatch}: ours {tokens[mismatch]} vs HF {theirs[mismatch]}, "
        f"not a tie (gap {float(top2[0] - top2[1]):.2e})"
    )
    hf_logprob = float(torch.log_softmax(logits, -1)[tokens[mismatch]])
    assert abs(logprobs[mismatch] - hf_logprob) < 1e-3
    warnings.warn(f"{name}: fp32 tie at token {mismatch}; compared teacher-forced log-probs there",
                  stacklevel=1)


@pytest.mark.parametrize("name", list(SMOLLM2_PROMPTS))
def test_smollm2_gguf_greedy_matches_hf(name: str, smollm2_hf, smollm2_outputs) -> None:
    ours = smollm2_outputs[name]
    _assert_greedy_matches_hf(name, SMOLLM2_PROMPTS[name], list(ours.outputs),
                              [lp.logprob for lp in ours.logprobs], smollm2_hf)


def test_smollm2_offline_api_and_grpc_cluster_match_hf(smollm2_hf) -> None:
    """The same prompts through ``pagedserve.LLM`` and then the full router -> scheduler ->
    worker gRPC path (the worker's loaded model is reused), greedy, 32 tokens each."""
    from pagedserve import LLM, make_sampling_params
    from protos.pagedserve.v1 import common_pb2, generation_pb2
    from tests.support.cluster import ClusterThread

    prompts = list(SMOLLM2_PROMPTS.items())
    params = make_sampling_params(max_tokens=SMOLLM2_TOKENS, temperature=0, ignore_eos=True,
                                  logprobs=1)
    llm = LLM(None, num_gpu_blocks=64, dtype="float32", swap_space_gib=0.01)
    outs = llm.generate([p for _, p in prompts], params)
    for (name, prompt), out in zip(prompts, outs, strict=True):
        assert out.outputs[0].text  # detokenized
        _assert_greedy_matches_hf(f"offline/{name}", prompt, out.outputs[0].token_ids,
                                  [lp.logprob for lp in out.outputs[0].logprobs],
                                  smollm2_hf)
    llm.close()
    cluster = ClusterThread([llm.worker.config], workers=[llm.worker])
    try:
        for name, prompt in prompts:
            req = generation_pb2.GenerateRequest(
                token_ids=generation_pb2.TokenIds(ids=prompt),
                params=common_pb2.SamplingParams(max_tokens=SMOLLM2_TOKENS, temperature=0.0,
                                                 ignore_eos=True, logprobs=1))
            msgs = list(cluster.generation.Generate(req, timeout=120))
            tokens = [t for m in msgs for t in m.token_ids]
            logprobs = [lp.logprob for m in msgs for lp in m.logprobs]
            _assert_greedy_matches_hf(f"cluster/{name}", prompt, tokens, logprobs, smollm2_hf)
    finally:
        cluster.stop()



def _two_steps(runner: ModelRunner, config) -> torch.Tensor:
    """Hidden states of two steps through ``runner``'s execution: step 1 prefills two prompts;
    step 2 mixes a decode, a fresh prefill and a prefill chunk over cached context."""
    execution = runner.execution
    caches = [(torch.zeros(64, 4, config.num_kv_heads, config.head_dim),
               torch.zeros(64, 4, config.num_kv_heads, config.head_dim))
              for _ in range(config.num_layers)]
    prompts = _prompts(5, [9, 14, 6], config.vocab_size)
    seqs = []
    for i, prompt in enumerate(prompts):
        seq = SequenceState(i, prompt, len(prompt), ResolvedParams(temperature=0.0))
        seq.block_table = list(range(10 * i, 10 * i + 10))
        seqs.append(seq)
    hidden = []
    with torch.inference_mode():
        for work in ([ScheduledWork(s, 0, s.num_tokens, True) for s in seqs[:2]],
                     [ScheduledWork(seqs[0], 8, 1, True), ScheduledWork(seqs[2], 0, 6, True),
                      ScheduledWork(seqs[1], 10, 4, True)]):
            inputs = runner.prepare(work)
            hidden.append(execution.forward(inputs.input_ids, inputs.positions, caches,
                                            inputs.meta))
    return torch.cat(hidden)


def test_fused_cpu_layer_equals_the_op_by_op_layer(cpu_isa: str | None) -> None:
    """``cpu_ops.LayerStack`` (every layer in one C++ call, the ``fused_cpu_stack`` path) runs the
    same kernels in the same order as ``LlamaDecoderLayer.forward`` op by op over packed
    projections and the kernels' primitives (the ``cpu_ops`` path): bit-identical hidden states,
    prefill and decode rows mixed in one step, with Qwen2-style q/k/v biases. Each variant
    against itself."""
    if cpu_isa is None:
        pytest.skip("fused CPU kernels off (PAGEDSERVE_CPU_KERNELS=0) or not built")
    path = tiny_llama_dir(architecture="qwen2")

    def run(execution_path: ExecutionPath | None) -> torch.Tensor:
        model, config = load_model(path, torch.float32, "cpu", TorchAttentionBackend())
        runner = ModelRunner(model, Sampler(config.eos_token_ids), 4, torch.device("cpu"),
                             path=execution_path)
        if execution_path is None:  # chosen, not forced
            assert isinstance(runner.execution, FusedCpuStackExecution), \
                runner.execution.describe()
        assert runner.execution.path is (execution_path or ExecutionPath.FUSED_CPU_STACK)
        return _two_steps(runner, config)

    assert torch.equal(run(None), run(ExecutionPath.CPU_OPS))


def _quantize_weights(model: torch.nn.Module, kind: str) -> None:
    """Every projection weight of ``model`` replaced by its GGUF ``kind`` round trip (gguf-py's
    quantizer, then dequantized to fp32), the embedding table by its Q8_0 round trip: what a
    GGUF model's loader hands over (SmolLM2's file: Q4_1 projections, a Q8_0 table)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                qtype = GGMLQuantizationType[kind if isinstance(module, torch.nn.Linear)
                                             else "Q8_0"]
                w = module.weight.detach().numpy()
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(
                    dequantize(quantize(w, qtype), qtype), dtype=np.float32)))


@pytest.mark.parametrize(("kind", "tied"), [("Q4_1", False), ("Q8_0", False), ("Q4_1", True)])
def test_weight_codes_give_the_hidden_states_of_fp32_panels(
        cpu_isa: str | None, kind: str, tied: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose weights came from a GGUF quantization keeps them as exact 8-bit codes
    (``PAGEDSERVE_CPU_WEIGHT_CODES``, on by default), its embedding table too (with tied
    embeddings the lookups share the logits projection's codes): the same hidden states and
    logits bit for bit as fp32 panels and table, on the fused stack and op by op, in a third of
    the memory."""
    if cpu_isa is None:
        pytest.skip("fused CPU kernels off (PAGEDSERVE_CPU_KERNELS=0) or not built")
    path = (tiny_llama_dir(tie_word_embeddings=True) if tied
            else tiny_llama_dir(architecture="qwen2"))

    def run(codes: bool, execution_path: ExecutionPath | None = None) -> tuple[torch.Tensor, int]:
        monkeypatch.setenv(cpu_ops.ENV_CODES, "1" if codes else "0")
        model, config = load_model(path, torch.float32, "cpu", TorchAttentionBackend())
        _quantize_weights(model, kind)
        runner = ModelRunner(model, Sampler(config.eos_token_ids), 4, torch.device("cpu"),
                             path=execution_path)
        linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
        assert all(m.has_codes == codes for m in linears)
        assert isinstance(model.embed_tokens, CodedEmbedding) == codes
        assert runner.execution.weight_format == ("codes" if codes else "fp32")
        assert f"{len(linears) if codes else 0} of {len(linears)} projections" in \
            runner.execution.describe()
        weight_bytes = sum(t.numel() * t.element_size()
                           for t in {id(t): t for t in model.buffers()}.values())
        weight_bytes += sum(p.numel() * p.element_size() for p in model.parameters()
                            if p.dim() == 2)  # an fp32 embedding table
        hidden = _two_steps(runner, config)
        return torch.cat([hidden, runner.execution.compute_logits(hidden)], dim=1), weight_bytes

    fp32, fp32_bytes = run(codes=False)
    coded, coded_bytes = run(codes=True)
    assert torch.equal(coded, fp32)
    assert torch.equal(run(codes=True, execution_path=ExecutionPath.CPU_OPS)[0], fp32)
    assert coded_bytes < 0.35 * fp32_bytes
