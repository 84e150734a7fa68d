"""How a loaded model runs: the execution path, chosen once at load by the model runner.

``LlamaForCausalLM`` is the math and the weight loading. Which kernels compute it is decided
here, once, from the device, the dtype, the C++ CPU kernels (``cpu_ops.load()``: the per-ISA
module, or None when they are off or unbuilt), the attention backend and the tensor-parallel
group size::

    path              when                                   what runs
    fused_cpu_stack   fp32 CPU, kernels built, torch         every decoder layer in one C++ call
                      attention, a head_dim the fused        (cpu_ops.LayerStack) over packed
                      prefill kernel takes                   weights; final norm and logits too
                      (the usual CPU worker)                 from the kernels
    cpu_ops           fp32 CPU, kernels built, but no        the model op by op: projections
                      fused stack (other head_dim, or a      packed (``PackedLinear``), RMSNorm,
                      tensor-parallel rank: it all-reduces   RoPE, SwiGLU from the kernels
                      inside each layer)
    torch             kernels off or unbuilt; not fp32;      the model op by op in torch ops; the
                      CUDA with the torch backend            attention backend as configured
    triton            CUDA with the Triton backend           the model op by op in torch ops,
                                                             Triton paged attention

Preparing a CPU path packs the projection weights into the panel layout of
``cpu_ops.packed_linear`` (``PackedLinear`` replaces each ``nn.Linear`` in the model, and the
logits matmul gets a packed copy of a tied embedding table) and lends the model the kernels'
RMSNorm, RoPE and SwiGLU (``CpuKernelOps``). The fused stack is bit-identical to ``cpu_ops`` op
by op (same kernels, same order); every path computes the same function as the torch reference.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from worker.attention.metadata import AttentionMetadata
from worker.attention.torch_backend import TorchAttentionBackend
from worker.kernels import cpu_ops
from worker.models.llama import (
    AttentionBackend,
    KVCache,
    LayerOps,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    split_qkv,
)

logger = logging.getLogger(__name__)


class ExecutionPath(enum.Enum):
    FUSED_CPU_STACK = "fused_cpu_stack"
    CPU_OPS = "cpu_ops"
    TORCH = "torch"
    TRITON = "triton"


# The paths a model prepared for one path could also run (a forced ``path``: tests, debugging):
# each computes the same function, from the fastest down.
_ALSO_RUNNABLE = {
    ExecutionPath.FUSED_CPU_STACK: (ExecutionPath.CPU_OPS, ExecutionPath.TORCH),
    ExecutionPath.CPU_OPS: (ExecutionPath.TORCH,),
    ExecutionPath.TORCH: (),
    ExecutionPath.TRITON: (),
}


@dataclass(frozen=True)
class PathChoice:
    path: ExecutionPath
    reason: str


def choose_path(device: torch.device, dtype: torch.dtype, kernels: ModuleType | None,
                backend: AttentionBackend, head_dim: int,
                tensor_parallel_size: int = 1) -> PathChoice:
    """The fastest path for this placement. ``kernels`` is ``cpu_ops.load()`` (None when the C++
    kernels are off or failed to build; not consulted off CPU or off fp32). A tensor-parallel
    rank needs an all-reduce after each row-parallel projection, inside the layer, which the
    fused stack (every layer in one C++ call) has no place for."""
    if device.type != "cpu":
        if backend.name == "triton":
            return PathChoice(ExecutionPath.TRITON, f"{device.type}: Triton paged attention")
        return PathChoice(ExecutionPath.TORCH,
                          f"{device.type}: torch ops, {backend.name} attention backend")
    if dtype != torch.float32:
        return PathChoice(ExecutionPath.TORCH,
                          f"{_dtype_name(dtype)} on CPU: the C++ kernels are fp32 only")
    if kernels is None:
        return PathChoice(ExecutionPath.TORCH,
                          "C++ CPU kernels off (PAGEDSERVE_CPU_KERNELS=0) or not built")
    isa = kernels.isa
    if not isinstance(backend, TorchAttentionBackend):
        return PathChoice(ExecutionPath.CPU_OPS, f"{isa} kernels op by op: the {backend.name} "
                          "attention backend has no fused layer step")
    if tensor_parallel_size > 1:
        return PathChoice(ExecutionPath.CPU_OPS, f"{isa} kernels op by op: tensor parallel "
                          f"({tensor_parallel_size} ranks) all-reduces inside each layer")
    if not kernels.prefill_attention_supported(head_dim):
        return PathChoice(ExecutionPath.CPU_OPS, f"{isa} kernels op by op: head_dim {head_dim} "
                          "not taken by the fused prefill kernel")
    return PathChoice(ExecutionPath.FUSED_CPU_STACK,
                      f"fp32 CPU, {isa} kernels: every layer in one C++ call")


def prepare_execution(model: LlamaForCausalLM, device: torch.device,
                      path: ExecutionPath | None = None,
                      tensor_parallel_size: int = 1) -> Execution:
    """Chooses the path for ``model`` (loaded, on ``device``; a shard of a model split over
    ``tensor_parallel_size`` ranks) and prepares the model for it. ``path`` forces a slower
    path than the chosen one (one it can run; ValueError otherwise). Call once per model:
    preparing packs its projections."""
    table = model.embed_tokens
    assert isinstance(table, nn.Embedding), "prepare a model once"
    dtype = table.weight.dtype
    kernels = cpu_ops.load() if device.type == "cpu" and dtype == torch.float32 else None
    choice = choose_path(device, dtype, kernels, model.backend, model.config.head_dim,
                         tensor_parallel_size)
    if path is not None and path is not choice.path:
        if path not in _ALSO_RUNNABLE[choice.path]:
            raise ValueError(f"execution path {path.value} cannot run here "
                             f"({choice.path.value}: {choice.reason})")
        choice = PathChoice(path, f"asked for instead of {choice.path.value} ({choice.reason})")
    if choice.path is ExecutionPath.FUSED_CPU_STACK:
        assert kernels is not None
        return FusedCpuStackExecution(model, choice, kernels)
    if choice.path is ExecutionPath.CPU_OPS:
        assert kernels is not None
        return CpuOpsExecution(model, choice, kernels)
    return Execution(model, choice)


class Execution:
    """The model op by op, in whatever modules and ops it holds (the ``torch`` and ``triton``
    paths: torch ops, and the attention backend the model was built with)."""

    def __init__(self, model: LlamaForCausalLM, choice: PathChoice) -> None:
        self.model = model
        self.choice = choice

    @property
    def path(self) -> ExecutionPath:
        return self.choice.path

    def describe(self) -> str:
        return f"{self.path.value} ({self.choice.reason})"

    @property
    def weight_format(self) -> str:
        """How the projection weights are held: ``codes`` (all as 8-bit codes), ``fp32`` (fp32
        panels), ``mixed`` (some of each) on the CPU paths; ``torch`` (the model's own tensors)
        elsewhere."""
        return "torch"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """``LlamaForCausalLM.forward``: final-normed hidden states ``[T, hidden]``; the K/V of
        every token written into its slot."""
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` fp32."""
        return self.model.compute_logits(hidden)


class CpuOpsExecution(Execution):
    """fp32 CPU, op by op: packed projections (``PackedLinear``) and the kernels' primitives."""

    def __init__(self, model: LlamaForCausalLM, choice: PathChoice, kernels: ModuleType) -> None:
        super().__init__(model, choice)
        self.kernels = kernels
        pack_projections(model, kernels)
        model.use_ops(CpuKernelOps(kernels))
        linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
        self.coded = sum(m.has_codes for m in linears)
        self.projections = len(linears)

    def describe(self) -> str:
        how = ("" if cpu_ops.weight_codes_enabled()
               else f"; {cpu_ops.ENV_CODES}=0")
        table = ("codes" if isinstance(self.model.embed_tokens, CodedEmbedding)
                 else "an fp32 table")
        return (f"{super().describe()}; weights: {self.coded} of {self.projections} projections "
                f"as exact 8-bit codes, the rest fp32 panels; embeddings: {table}{how}")

    @property
    def weight_format(self) -> str:
        if self.coded == self.projections:
            return "codes"
        return "fp32" if self.coded == 0 else "mixed"


class FusedCpuStackExecution(CpuOpsExecution):
    """fp32 CPU: every decoder layer in one call of ``cpu_ops.LayerStack`` (no Python between
    kernels), which runs the kernels of ``CpuOpsExecution`` in the same order."""

    def __init__(self, model: LlamaForCausalLM, choice: PathChoice, kernels: ModuleType) -> None:
        super().__init__(model, choice, kernels)
        if not isinstance(model.backend, TorchAttentionBackend):
            raise TypeError(f"the fused CPU stack plans its steps with the torch attention "
                            f"backend, not {model.backend.name}")
        self.backend = model.backend
        cfg = model.config
        self.head_dim, self.scale = cfg.head_dim, cfg.head_dim**-0.5
        self.stack = kernels.LayerStack(cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads,
                                        cfg.intermediate_size)
        for layer in model.decoder_layers():
            self.stack.add(*_stack_weights(layer))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        x, cos_sin = self.model.embed(input_ids, positions)
        attention = self.backend.layer_stack_args(meta, self.kernels, self.head_dim)
        x = self.stack.forward(x, *cos_sin, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                               meta.slot_mapping, self.scale, *attention)
        return self.model.norm(x)


class CpuKernelOps(LayerOps):
    """The layer primitives from the C++ kernels (fp32 CPU): the same functions as the torch
    ``LayerOps`` to rounding (RoPE bit for bit), the same kernels as ``cpu_ops.LayerStack``."""

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels
        self.name = f"cpu_ops/{kernels.isa}"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dim() != 2:
            return super().rms_norm(x, weight, eps)
        return self.kernels.rms_norm(x.contiguous(), weight, eps)

    def rope_qkv(self, qkv: torch.Tensor, cos_sin: KVCache, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # rotates q and k in place, in one pass over the fused rows
        self.kernels.rope_(qkv, *cos_sin, num_heads + num_kv_heads, head_dim)
        return split_qkv(qkv, num_heads, num_kv_heads, head_dim)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() != 2:
            return super().silu_mul(gate_up)
        return self.kernels.silu_mul(gate_up)


class PackedLinear(nn.Module):
    """``nn.Linear`` on fp32 CPU with its weight in the panel layout of ``cpu_ops.packed_linear``
    (``cpu_ops.cpp`` says why: MKL is 1.2-5x slower here), or as 8-bit codes where the weight is
    exactly scale * code + offset per block (``cpu_ops.weight_codes``: weights dequantized from
    GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; ``PAGEDSERVE_CPU_WEIGHT_CODES=0`` keeps fp32 panels): same
    bits, from a third of the memory and faster at decode sizes. Same function; the weight is
    packed once and the original freed. The output is fp32 (so is the input)."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None,
                 kernels: ModuleType, use_codes: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor
        self.codes: torch.Tensor
        self.scales: torch.Tensor
        coded = cpu_ops.weight_codes(weight) if use_codes else None
        if coded is None:
            packed = cpu_ops.pack_weight(weight.detach())
            codes, scales = torch.empty(0, dtype=torch.uint8), torch.empty(0)
        else:
            packed, (codes, scales) = torch.empty(0), coded
        self.register_buffer("packed", packed)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = bias
        self._no_bias = torch.empty(0)
        self.kernels = kernels

    @property
    def has_codes(self) -> bool:
        return self.codes.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        bias = self._no_bias if self.bias is None else self.bias
        out = self.kernels.linear(flat, self.packed, self.codes, self.scales, bias,
                                  self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def bias_or_empty(self) -> torch.Tensor:
        return self._no_bias if self.bias is None else self.bias.detach()

    def stack_weights(self) -> list[torch.Tensor]:
        """As ``cpu_ops.LayerStack.add`` takes a projection: panels, codes, scales."""
        return [self.packed, self.codes, self.scales]


def pack_projections(model: LlamaForCausalLM, kernels: ModuleType) -> None:
    """Every projection of ``model`` and its logits matmul move to ``PackedLinear``. Tied
    embeddings keep their table for lookups and gain a packed copy for the logits (one more
    vocab x hidden matrix) as ``model.lm_head`` (on a rank that computes logits). The
    row-parallel all-reduce lives on the attention and MLP modules, not on the projections, so
    it stays around the packed ones. An embedding table with exact 8-bit codes becomes a
    ``CodedEmbedding`` (tied: over the logits projection's codes, the fp32 table dropped)."""

    use_codes = cpu_ops.weight_codes_enabled()

    def packed(linear: nn.Module) -> PackedLinear:
        if isinstance(linear, PackedLinear):
            return linear
        assert isinstance(linear, nn.Linear)
        return PackedLinear(linear.weight, linear.bias, kernels, use_codes)

    for layer in model.decoder_layers():
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj, attn.o_proj = packed(attn.qkv_proj), packed(attn.o_proj)
        mlp.gate_up_proj, mlp.down_proj = packed(mlp.gate_up_proj), packed(mlp.down_proj)
    table = model.embed_tokens
    assert isinstance(table, nn.Embedding)
    tied = model.computes_logits and model.lm_head is None
    if tied:
        head = PackedLinear(table.weight, None, kernels, use_codes)
        model.lm_head = head
        if head.has_codes:  # the lookups read the logits projection's codes; the table goes
            model.embed_tokens = CodedEmbedding(head.codes, head.scales, *table.weight.shape)
        return
    if model.computes_logits and model.lm_head is not None:
        model.lm_head = packed(model.lm_head)
    coded = cpu_ops.weight_codes(table.weight) if use_codes else None
    if coded is not None:
        model.embed_tokens = CodedEmbedding(*coded, *table.weight.shape)


class CodedEmbedding(nn.Module):
    """An embedding table held as ``cpu_ops.weight_codes``' exact 8-bit codes (in the panel
    layout: row ``i`` is column ``i % 48`` of panel ``i // 48``): a lookup rebuilds its rows as
    ``scale * code + offset`` (the product exact, so the same fp32 values as the table), from a
    third of the memory. With tied embeddings it shares the logits projection's codes."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, num_embeddings: int,
                 embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.codes: torch.Tensor
        self.scales: torch.Tensor
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        panel, col = flat // cpu_ops.PANEL, flat % cpu_ops.PANEL
        codes = self.codes[panel, :, col].view(flat.numel(), -1, cpu_ops.CODE_BLOCK)
        scales = self.scales[panel, :, :, col]  # [T, K / 32, 2]
        rows = codes.float() * scales[..., 0:1] + scales[..., 1:2]
        return rows.view(*input_ids.shape, self.embedding_dim)


def _stack_weights(layer: LlamaDecoderLayer) -> tuple[torch.Tensor, torch.Tensor,
                                                     list[torch.Tensor]]:
    """One layer's weights as ``cpu_ops.LayerStack.add`` takes them: the norms, then each
    projection's panels, codes and scales, then the qkv and o biases."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    assert (isinstance(qkv, PackedLinear) and isinstance(o, PackedLinear)
            and isinstance(gate_up, PackedLinear) and isinstance(down, PackedLinear))
    weights = [*qkv.stack_weights(), *o.stack_weights(), *gate_up.stack_weights(),
               *down.stack_weights(), qkv.bias_or_empty(), o.bias_or_empty()]
    return (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
            weights)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
