"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2-style biases) over a flat ragged batch.

Every scheduled sequence's new tokens are concatenated into one ``[num_tokens]`` dimension; the
attention backend uses ``AttentionMetadata`` to find each token's sequence, position and KV slots.
So there is no Python loop over sequences here: each layer is a handful of batched matmuls.

q/k/v and gate/up are fused into one matmul each. ``load_weights`` takes Hugging Face tensor names
and copies the separate HF projections into their slices of the fused weights.

Numerics follow HF ``LlamaForCausalLM`` (RMSNorm in fp32, RoPE cos/sin in fp32, residual adds in
the model dtype) so that fp32 outputs match it to rounding.

This module is the math and the weight loading, nothing about which kernels run: each layer runs
op by op over whatever projection modules it holds (``nn.Linear`` as loaded) and the primitives
of a ``LayerOps`` (torch by default). ``worker/models/execution.py``, owned by the model runner,
chooses the execution path once at load and prepares the model for it (packed projections and
the C++ primitives on fp32 CPU, or every layer in one C++ call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention.metadata import AttentionMetadata
from worker.models.config import ModelConfig, RopeScaling

KVCache = tuple[torch.Tensor, torch.Tensor]
# Sums a row-parallel projection's partial outputs over the ranks of a tensor-parallel group, in
# place (``worker/parallel.py``); the identity when the model is whole.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x


class AttentionBackend(Protocol):
    """The interface of ``TorchAttentionBackend``; the Triton backend provides the same."""

    name: str

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def forward(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


class LayerOps:
    """The primitives a decoder layer is written in besides its projections, in torch: RMSNorm,
    RoPE on the fused q/k/v rows, and SwiGLU's ``silu(gate) * up``. This is the reference; an
    execution path may lend the model an implementation of the same functions with other
    kernels (``LlamaForCausalLM.use_ops``)."""

    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def rope_qkv(self, qkv: torch.Tensor, cos_sin: KVCache, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv`` ``[T, (H + 2 KVH) * D]`` -> q ``[T, H, D]``, k and v ``[T, KVH, D]``, q and k
        rotated."""
        q, k, v = split_qkv(qkv, num_heads, num_kv_heads, head_dim)
        return apply_rope(q, *cos_sin), apply_rope(k, *cos_sin), v

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)  # in place: one [T, I] buffer, not two


TORCH_OPS = LayerOps()


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of the fused ``[T, (H + 2 KVH) * D]`` rows: q ``[T, H, D]``, k and v
    ``[T, KVH, D]``."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (q.view(num_tokens, num_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim),
            v.view(num_tokens, num_kv_heads, head_dim))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """``[head_dim // 2]`` fp32 inverse frequencies, with "linear" or "llama3" scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a blend between."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (``rotate_half``) RoPE, the HF layout. ``inv_freq`` is a non-persistent
    buffer: ``reset_buffers`` recomputes it after the module is materialised from ``meta``."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.scaling = config.rope_scaling
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, freq_divisors: torch.Tensor | None = None) -> None:
        """``freq_divisors`` (GGUF ``rope_freqs``) divide the base frequencies (as llama.cpp)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        if freq_divisors is not None:
            inv_freq = inv_freq / freq_divisors.float().cpu()
        with torch.no_grad():
            self.inv_freq = inv_freq.to(self.inv_freq.device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> KVCache:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` is ``[num_tokens, heads, head_dim]``; cos/sin are ``[num_tokens, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim**-0.5
        self.qkv_proj: nn.Module = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj: nn.Module = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.backend = backend
        self.ops = TORCH_OPS
        self.all_reduce: AllReduce = _whole

    def forward(
        self, x: torch.Tensor, cos_sin: KVCache, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.ops.rope_qkv(self.qkv_proj(x), cos_sin, self.num_heads, self.num_kv_heads,
                                    self.head_dim)
        key_cache, value_cache = kv_cache
        self.backend.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        out = self.backend.forward(q, key_cache, value_cache, meta, self.scale)
        return self.all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj: nn.Module = nn.Linear(hidden, 2 * inner, bias=False)
        self.down_proj: nn.Module = nn.Linear(inner, hidden, bias=False)
        self.ops = TORCH_OPS
        self.all_reduce: AllReduce = _whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(self.down_proj(self.ops.silu_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, cos_sin: KVCache, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Owns the weights and the math; the KV caches are lent to it per call, the attention
    backend at construction.

    Invariant: ``len(kv_caches) == num_layers`` and every cache is
    ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Tensor parallel: ``config`` is this rank's slice (``worker/models/sharding.py``), the
    row-parallel projections are summed over the group (``use_all_reduce``), and a model built
    with ``computes_logits=False`` (a follower rank) has no logits projection at all.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend,
                 computes_logits: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.computes_logits = computes_logits
        # nn.Embedding; on the CPU paths it may become execution.CodedEmbedding (same lookups)
        self.embed_tokens: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # The logits projection; None: tied, the embedding table (an execution path may set a
        # module computing the same product, e.g. from a packed copy of the table).
        self.lm_head: nn.Module | None = (
            None
            if config.tie_word_embeddings or not computes_logits
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def decoder_layers(self) -> list[LlamaDecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, LlamaDecoderLayer)]

    def use_ops(self, ops: LayerOps) -> None:
        """Every norm, attention and MLP computes its primitives with ``ops`` from now on."""
        for module in self.modules():
            if isinstance(module, RMSNorm | LlamaAttention | LlamaMLP):
                module.ops = ops

    def use_all_reduce(self, all_reduce: AllReduce) -> None:
        """Every o_proj and down_proj output is summed over the tensor-parallel group with
        ``all_reduce`` from now on (kept when an execution path swaps the projections)."""
        for module in self.modules():
            if isinstance(module, LlamaAttention | LlamaMLP):
                module.all_reduce = all_reduce

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, KVCache]:
        """``[T]`` ids and positions -> hidden states ``[T, hidden]`` and RoPE ``(cos, sin)``."""
        x = self.embed_tokens(input_ids)
        return x, self.rotary.cos_sin(positions, x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the final-normed hidden states ``[T, hidden]``; K/V of all T tokens are
        written into their slots."""
        x, cos_sin = self.embed(input_ids, positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, kv_cache, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` fp32."""
        if not self.computes_logits:
            raise RuntimeError("this rank computes no logits: the leader rank samples")
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        assert isinstance(self.embed_tokens, nn.Embedding)  # tied, never re-held as codes
        return F.linear(hidden, self.embed_tokens.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors in, fusing q/k/v and gate/up. Raises ValueError on an unknown
        name or a shape mismatch, and if any parameter is left unset."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target, rows = self._route(hf_name)
            if target is None:
                continue
            if target not in params:
                raise ValueError(f"weight {hf_name!r} has no place in this model")
            dst = params[target].data
            dst = dst if rows is None else dst[rows[0] : rows[1]]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {hf_name!r}: shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(target if rows is None else f"{target}[{rows[0]}]")
        self._check_all_loaded(loaded)

    def _route(self, hf_name: str) -> tuple[str | None, tuple[int, int] | None]:
        """HF name -> (our parameter name, row slice of a fused weight or None)."""
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name:
            return None, None
        if name == "lm_head.weight" and (self.config.tie_word_embeddings
                                         or not self.computes_logits):
            return None, None  # tied: some checkpoints store the copy anyway
        cfg = self.config
        fused = {
            "self_attn.q_proj": ("self_attn.qkv_proj", 0, cfg.q_size),
            "self_attn.k_proj": ("self_attn.qkv_proj", cfg.q_size, cfg.q_size + cfg.kv_size),
            "self_attn.v_proj": ("self_attn.qkv_proj", cfg.q_size + cfg.kv_size,
                                 cfg.q_size + 2 * cfg.kv_size),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, cfg.intermediate_size),
            "mlp.up_proj": ("mlp.gate_up_proj", cfg.intermediate_size,
                            2 * cfg.intermediate_size),
        }
        for hf_part, (ours, start, end) in fused.items():
            if f".{hf_part}." in name:
                return name.replace(hf_part, ours), (start, end)
        return name, None

    def _check_all_loaded(self, loaded: set[str]) -> None:
        cfg = self.config
        expected_parts = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
        missing = []
        for pname, _ in self.named_parameters():
            base = pname.rsplit(".", 1)[0]
            parts = next((n for k, n in expected_parts.items() if base.endswith(k)), 0)
            num_loaded = sum(1 for x in loaded if x.startswith(pname + "["))
            if (parts == 0 and pname not in loaded) or (parts and num_loaded != parts):
                missing.append(pname)
        if missing:
            raise ValueError(f"checkpoint for {cfg.name!r} lacks weights: {missing[:5]}")
