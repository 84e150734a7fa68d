"""``worker.models.execution``: the execution path is chosen once, from device, dtype, the C++
CPU kernels and the attention backend, and preparing it packs the model for its kernels.

The choice is checked against a fake kernel module (no build), and once for real on every
instruction-set variant this CPU runs (``cpu_isa``)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from worker.attention.torch_backend import TorchAttentionBackend
from worker.model_runner import ModelRunner, ScheduledWork
from worker.models import execution
from worker.models.config import ModelConfig
from worker.models.execution import (
    CpuKernelOps,
    CpuOpsExecution,
    Execution,
    ExecutionPath,
    FusedCpuStackExecution,
    PackedLinear,
    choose_path,
    prepare_execution,
)
from worker.models.llama import TORCH_OPS, LlamaAttention, LlamaForCausalLM, LlamaMLP, RMSNorm
from worker.models.loader import build_empty_model
from worker.sampler import ResolvedParams, Sampler
from worker.sequence_state import SequenceState

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(0,))


class FakeStack:
    def __init__(self, eps: float, num_heads: int, num_kv_heads: int, inner: int) -> None:
        self.shape = (eps, num_heads, num_kv_heads, inner)
        self.layers: list[tuple[torch.Tensor, ...]] = []

    def add(self, in_norm: torch.Tensor, post_norm: torch.Tensor,
            weights: list[torch.Tensor]) -> None:
        self.layers.append((in_norm, post_norm, *weights))


def fake_kernels(isa: str = "avx2", max_head_dim: int = 128) -> SimpleNamespace:
    """The parts of a ``cpu_ops`` variant module the choice and the preparation use."""
    return SimpleNamespace(isa=isa, prefill_attention_supported=lambda d: 16 <= d <= max_head_dim,
                           LayerStack=FakeStack)


class FakeTriton:
    name = "triton"


class FakeOtherBackend:
    name = "other"


def _never_load(isa: str | None = None) -> None:
    raise AssertionError("cpu_ops.load() must not be called here")


# ------------------------------------------------------------------------------ choose_path


@pytest.mark.parametrize(
    ("device", "dtype", "kernels", "backend", "head_dim", "expected"),
    [
        (CPU, torch.float32, fake_kernels(), TorchAttentionBackend(), 64,
         ExecutionPath.FUSED_CPU_STACK),
        (CPU, torch.float32, None, TorchAttentionBackend(), 64, ExecutionPath.TORCH),
        (CPU, torch.bfloat16, fake_kernels(), TorchAttentionBackend(), 64, ExecutionPath.TORCH),
        (CPU, torch.float16, fake_kernels(), TorchAttentionBackend(), 64, ExecutionPath.TORCH),
        (CPU, torch.float32, fake_kernels(), TorchAttentionBackend(), 256,
         ExecutionPath.CPU_OPS),  # a head_dim the fused prefill kernel does not take
        (CPU, torch.float32, fake_kernels(), FakeOtherBackend(), 64, ExecutionPath.CPU_OPS),
        (CUDA, torch.bfloat16, None, FakeTriton(), 64, ExecutionPath.TRITON),
        (CUDA, torch.float32, None, FakeTriton(), 64, ExecutionPath.TRITON),
        (CUDA, torch.bfloat16, None, TorchAttentionBackend(), 64, ExecutionPath.TORCH),
    ],
    ids=["fp32-cpu-kernels", "kernels-off", "bf16-cpu", "fp16-cpu", "head-dim-256",
         "other-backend", "cuda-triton", "cuda-fp32-triton", "cuda-torch"],
)
def test_the_path_chosen_for_each_placement(device, dtype, kernels, backend, head_dim,
                                            expected) -> None:
    choice = choose_path(device, dtype, kernels, backend, head_dim)
    assert choice.path is expected
    assert choice.reason


def test_the_reason_names_the_kernel_variant() -> None:
    choice = choose_path(CPU, torch.float32, fake_kernels("avx512"), TorchAttentionBackend(), 64)
    assert "avx512" in choice.reason


# ------------------------------------------------------------------------ prepare_execution


def _model(dtype: torch.dtype = torch.float32, backend: object = None,
           config: ModelConfig = CONFIG) -> LlamaForCausalLM:
    model = build_empty_model(config, dtype, CPU, backend or TorchAttentionBackend())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _ops_in_use(model: LlamaForCausalLM) -> set[object]:
    return {m.ops for m in model.modules() if isinstance(m, RMSNorm | LlamaAttention | LlamaMLP)}


def _projections(model: LlamaForCausalLM) -> list[torch.nn.Module]:
    out = []
    for layer in model.decoder_layers():
        out += [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                layer.mlp.down_proj]
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_fp32_cpu_with_kernels_prepares_the_fused_stack(monkeypatch, tied: bool) -> None:
    kernels = fake_kernels(max_head_dim=128)
    monkeypatch.setattr(execution.cpu_ops, "load", lambda: kernels)
    config = replace(CONFIG, head_dim=16, tie_word_embeddings=tied)
    model = _model(config=config)
    run = prepare_execution(model, CPU)
    assert isinstance(run, FusedCpuStackExecution)
    assert run.path is ExecutionPath.FUSED_CPU_STACK
    assert all(isinstance(p, PackedLinear) and p.kernels is kernels for p in _projections(model))
    assert isinstance(model.lm_head, PackedLinear)  # tied: a packed copy of the table
    assert {type(ops) for ops in _ops_in_use(model)} == {CpuKernelOps}
    stack = run.stack
    assert isinstance(stack, FakeStack) and len(stack.layers) == config.num_layers
    assert stack.shape == (config.rms_norm_eps, 4, 2, 48)
    # norms, 4 projections x (panels, codes, scales), qkv and o biases
    assert all(len(weights) == 2 + 4 * 3 + 2 for weights in stack.layers)


def test_an_unsupported_head_dim_runs_cpu_ops_op_by_op(monkeypatch) -> None:
    kernels = fake_kernels(max_head_dim=128)
    monkeypatch.setattr(execution.cpu_ops, "load", lambda: kernels)
    model = _model()  # head_dim 8
    run = prepare_execution(model, CPU)
    assert type(run) is CpuOpsExecution and run.path is ExecutionPath.CPU_OPS
    assert all(isinstance(p, PackedLinear) for p in _projections(model))
    assert {type(ops) for ops in _ops_in_use(model)} == {CpuKernelOps}


def test_kernels_off_leave_the_model_on_torch_ops(monkeypatch) -> None:
    monkeypatch.setattr(execution.cpu_ops, "load", lambda: None)
    model = _model()
    run = prepare_execution(model, CPU)
    assert type(run) is Execution and run.path is ExecutionPath.TORCH
    assert all(type(p) is torch.nn.Linear for p in _projections(model))
    assert _ops_in_use(model) == {TORCH_OPS}
    assert "PAGEDSERVE_CPU_KERNELS" in run.describe()


def test_a_bf16_cpu_model_runs_torch_ops_without_loading_the_kernels(monkeypatch) -> None:
    monkeypatch.setattr(execution.cpu_ops, "load", _never_load)
    model = _model(torch.bfloat16)
    run = prepare_execution(model, CPU)
    assert run.path is ExecutionPath.TORCH
    assert all(type(p) is torch.nn.Linear for p in _projections(model))


@pytest.mark.parametrize(("backend", "expected"), [(FakeTriton(), ExecutionPath.TRITON),
                                                   (TorchAttentionBackend(), ExecutionPath.TORCH)])
def test_cuda_runs_the_configured_backend_without_the_cpu_kernels(monkeypatch, backend,
                                                                  expected) -> None:
    """The device is only named (the model stays on CPU): nothing here touches CUDA."""
    monkeypatch.setattr(execution.cpu_ops, "load", _never_load)
    model = _model(torch.bfloat16, backend)
    run = prepare_execution(model, CUDA)
    assert type(run) is Execution and run.path is expected
    assert _ops_in_use(model) == {TORCH_OPS}


def test_a_forced_path_must_be_one_the_placement_can_run(monkeypatch) -> None:
    monkeypatch.setattr(execution.cpu_ops, "load", lambda: fake_kernels())
    config = replace(CONFIG, head_dim=16)
    run = prepare_execution(_model(config=config), CPU, ExecutionPath.CPU_OPS)
    assert type(run) is CpuOpsExecution and "fused_cpu_stack" in run.describe()
    with pytest.raises(ValueError, match="triton cannot run here"):
        prepare_execution(_model(config=config), CPU, ExecutionPath.TRITON)
    monkeypatch.setattr(execution.cpu_ops, "load", lambda: None)
    with pytest.raises(ValueError, match="fused_cpu_stack cannot run here"):
        prepare_execution(_model(config=config), CPU, ExecutionPath.FUSED_CPU_STACK)


def test_every_path_computes_the_same_function(cpu_isa: str | None) -> None:
    """Real kernels (each variant): the path chosen for an fp32 CPU model and the torch path give
    the same hidden states and logits to rounding, on a step mixing prefill, a chunk over cached
    context and a decode."""
    from worker.kernels import cpu_ops

    config = replace(CONFIG, head_dim=16)
    reference = _model(config=config)
    model = _model(config=config)
    model.load_state_dict(reference.state_dict())
    runner = ModelRunner(model, Sampler(), 4, CPU)
    if cpu_isa is None:
        assert runner.execution.path is ExecutionPath.TORCH
    else:
        assert runner.execution.path is ExecutionPath.FUSED_CPU_STACK
        assert cpu_ops.load().isa == cpu_isa and cpu_isa in runner.execution.describe()
    ref_runner = ModelRunner(reference, Sampler(), 4, CPU, path=ExecutionPath.TORCH)
    assert ref_runner.execution.path is ExecutionPath.TORCH
    gen = torch.Generator().manual_seed(1)
    seqs = [SequenceState(i, torch.randint(3, config.vocab_size, (n,), generator=gen).tolist(),
                          n, ResolvedParams(temperature=0.0)) for i, n in enumerate([7, 9, 6])]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(4 * i, 4 * i + 4))
    work = [ScheduledWork(seqs[0], 0, 7, True), ScheduledWork(seqs[1], 4, 5, True),
            ScheduledWork(seqs[2], 5, 1, True)]
    outs = []
    for r in (runner, ref_runner):
        caches = [(torch.randn(12, 4, 2, 16, generator=torch.Generator().manual_seed(2)),
                   torch.randn(12, 4, 2, 16, generator=torch.Generator().manual_seed(3)))
                  for _ in range(config.num_layers)]
        inputs = r.prepare(work)
        with torch.inference_mode():
            hidden = r.execution.forward(inputs.input_ids, inputs.positions, caches, inputs.meta)
            outs.append((hidden, r.execution.compute_logits(hidden)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4)
