"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2-style biases) over a flat ragged batch.

Every scheduled sequence's new tokens are concatenated into one ``[num_tokens]`` dimension; the
attention backend uses ``AttentionMetadata`` to find each token's sequence, position and KV slots.
So there is no Python loop over sequences here: each layer is a handful of batched matmuls.

q/k/v and gate/up are fused into one matmul each. ``load_weights`` takes Hugging Face tensor names
and copies the separate HF projections into their slices of the fused weights.

Numerics follow HF ``LlamaForCausalLM`` (RMSNorm in fp32, RoPE cos/sin in fp32, residual adds in
the model dtype) so that fp32 outputs match it to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention.metadata import AttentionMetadata
from worker.kernels import cpu_ops
from worker.models.config import ModelConfig, RopeScaling

KVCache = tuple[torch.Tensor, torch.Tensor]


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


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = _fused_ops(x)
        if ops is not None and x.dim() == 2:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class PackedLinear(nn.Module):
    """``nn.Linear`` on fp32 CPU with its weight in the panel layout of ``cpu_ops.packed_linear``
    (``cpu_ops.cpp`` says why: MKL is 1.2-5x slower here). Same function; the weight is packed
    once and the original freed."""

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None, ops: ModuleType) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed: torch.Tensor
        self.register_buffer("packed", cpu_ops.pack_weight(weight.detach()))
        self.bias = bias
        self._no_bias = torch.empty(0)
        self._ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        bias = self._no_bias if self.bias is None else self.bias
        out = self._ops.packed_linear(flat, self.packed, bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)


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


def _fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The fused CPU kernels when ``x`` is an fp32 CPU tensor and they could be built."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    return cpu_ops.load()


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

    def forward(
        self, x: torch.Tensor, cos_sin: KVCache, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        ops = _fused_ops(qkv)
        if ops is not None:  # rotates q and k in place, in one pass over the fused rows
            ops.rope_(qkv, *cos_sin, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        if ops is None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        key_cache, value_cache = kv_cache
        self.backend.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        out = self.backend.forward(q, key_cache, value_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj: nn.Module = nn.Linear(hidden, 2 * inner, bias=False)  # PackedLinear
        self.down_proj: nn.Module = nn.Linear(inner, hidden, bias=False)  # once packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = _fused_ops(gate_up)
        if ops is not None and gate_up.dim() == 2:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one [T, I] buffer, not two


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

    def fused_weights(self) -> tuple | None:
        """This layer's weights as ``cpu_ops.LayerStack.add`` takes them (norms, packed
        projections, biases), or None when a projection is not packed."""
        attn, mlp = self.self_attn, self.mlp
        qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
        if not (isinstance(qkv, PackedLinear) and isinstance(o, PackedLinear)
                and isinstance(gate_up, PackedLinear) and isinstance(down, PackedLinear)):
            return None
        no_bias = qkv._no_bias
        return (self.input_layernorm.weight.detach(),
                self.post_attention_layernorm.weight.detach(), qkv.packed,
                no_bias if qkv.bias is None else qkv.bias.detach(), o.packed,
                no_bias if o.bias is None else o.bias.detach(), gate_up.packed, down.packed)


class LlamaForCausalLM(nn.Module):
    """Owns the weights; the KV caches and the attention backend are lent to it per call.

    Invariant: ``len(kv_caches) == num_layers`` and every cache is
    ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend) for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.lm_head: nn.Module | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.packed_logits: PackedLinear | None = None  # tied embeddings, once packed
        # cpu_ops.LayerStack holding every layer's weights; [] = not worked out yet, None = some
        # layer cannot run fused (see _fused_layers).
        self._fused: Any = []

    def set_backend(self, backend: AttentionBackend) -> None:
        self._fused = []
        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.backend = backend

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the final-normed hidden states ``[T, hidden]``; K/V of all T tokens are
        written into their slots."""
        x = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        fused = self._fused_layers(x, kv_caches, meta)
        if fused is not None:  # one C++ call for every layer: no Python between kernels
            stack, plan = fused
            x = stack.forward(x, *cos_sin, [k for k, _ in kv_caches], [v for _, v in kv_caches],
                              meta.slot_mapping, self.config.head_dim**-0.5, *plan)
            return self.norm(x)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, kv_cache, meta)
        return self.norm(x)

    def _fused_layers(self, x: torch.Tensor, kv_caches: list[KVCache], meta: AttentionMetadata
                      ) -> tuple[Any, tuple] | None:
        """``(cpu_ops.LayerStack, attention plan)`` when every layer can run as one
        ``decoder_layer`` of cpu_ops.cpp (fp32 CPU, packed projections, the torch backend's fused
        attention for this step), else None: the same computation, op by op."""
        ops = _fused_ops(x)
        if ops is None or x.dim() != 2 or not kv_caches or kv_caches[0][0].dtype != x.dtype:
            return None
        layer0 = self.layers[0] if len(self.layers) else None
        if not isinstance(layer0, LlamaDecoderLayer):
            return None
        cpu_layer_args = getattr(layer0.self_attn.backend, "cpu_layer_args", None)
        if self._fused == []:
            layers = [layer.fused_weights() for layer in self.layers
                      if isinstance(layer, LlamaDecoderLayer)]
            usable = (len(layers) == len(self.layers) and all(w is not None for w in layers)
                      and cpu_layer_args is not None)
            self._fused = None
            if usable:
                cfg = self.config
                stack = ops.LayerStack(cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads,
                                       cfg.intermediate_size)
                for weights in layers:
                    assert weights is not None
                    stack.add(*weights)
                self._fused = stack
        if self._fused is None or cpu_layer_args is None:
            return None
        plan = cpu_layer_args(meta, self.config.head_dim)
        return None if plan is None else (self._fused, plan)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` fp32."""
        if self.packed_logits is not None:
            return self.packed_logits(hidden)
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()

    def pack_weights(self) -> bool:
        """After ``load_weights``, on fp32 CPU where the fused kernels built: every projection and
        the logits matmul move to ``PackedLinear``. Tied embeddings keep their table for lookups
        and gain a packed copy for the logits (one more vocab x hidden matrix). Returns whether
        the weights were packed."""
        ops = cpu_ops.load()
        table = self.embed_tokens.weight
        if (ops is None or table.device.type != "cpu" or table.dtype != torch.float32
                or not ops.packed_linear_supported()):
            return False

        def packed(linear: nn.Module) -> PackedLinear:
            assert isinstance(linear, nn.Linear)
            return PackedLinear(linear.weight, linear.bias, ops)

        for layer in self.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj, attn.o_proj = packed(attn.qkv_proj), packed(attn.o_proj)
            mlp.gate_up_proj, mlp.down_proj = packed(mlp.gate_up_proj), packed(mlp.down_proj)
        if self.lm_head is None:
            self.packed_logits = PackedLinear(table, None, ops)
        else:
            self.lm_head = packed(self.lm_head)
        self._fused = []
        return True

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
        if name == "lm_head.weight" and self.lm_head is None:
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
