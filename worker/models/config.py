"""``ModelConfig``: the shape of a Llama-family decoder, read from HF ``config.json`` or GGUF
metadata.

Both sources are reduced to the same frozen dataclass, so the model code never knows where the
weights came from. RoPE scaling is kept as a small ``RopeScaling`` record ("default", "linear" or
"llama3"); anything else is refused at load time rather than silently computed wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` "llama3" uses the factor/low/high/original fields."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported; "
                f"use one of {SUPPORTED_ROPE_TYPES}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Invariants: ``num_heads % num_kv_heads == 0``; ``eos_token_ids`` is never empty."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # Llama's attention_bias also biases o_proj; Qwen2's does not
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if not self.eos_token_ids:
            raise ValueError("the model config names no EOS token id")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_break_even_context(self) -> int:
        """The context length at which one token's attention (QK^T and PV: 4 FLOPs per query
        head dimension per context token) costs as many FLOPs as its projections (2 per weight
        of a layer's q, k, v, o, gate, up and down). The scheduler shrinks prefill chunks deep
        into long prompts by this (``scheduler/policy.py:chunk_cost``). SmolLM2-135M: 3,072;
        Llama-2-7B: about 24,600."""
        h, i = self.hidden_size, self.intermediate_size
        weights = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i
        return max(1, weights // (2 * self.q_size))

    @classmethod
    def from_hf_dir(cls, path: str | Path, name: str | None = None) -> ModelConfig:
        raw = json.loads((Path(path) / "config.json").read_text())
        return cls.from_hf_dict(raw, name=name or Path(path).name)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], name: str = "llama") -> ModelConfig:
        model_type = raw.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not a supported Llama-family model")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        theta, scaling = _hf_rope(raw)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            o_proj_bias=model_type != "qwen2" and bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            name=name,
        )

    @classmethod
    def from_gguf_fields(
        cls, fields: dict[str, Any], tensor_names: set[str], name: str = "gguf"
    ) -> ModelConfig:
        """``fields`` maps GGUF metadata keys to plain Python values (see
        ``loader.gguf_fields``)."""
        arch = fields["general.architecture"]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"GGUF architecture {arch!r} is not a supported Llama-family model")

        def get(key: str, default: Any = None) -> Any:
            return fields.get(f"{arch}.{key}", default)

        num_heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or 0)
        vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", ()))
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv") or num_heads),
            head_dim=head_dim or hidden // num_heads,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope(get),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            o_proj_bias="blk.0.attn_output.bias" in tensor_names,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_as_id_tuple(fields.get("tokenizer.ggml.eos_token_id")),
            name=name,
        )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _hf_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    """transformers < 5 writes ``rope_theta`` + ``rope_scaling``; 5.x writes ``rope_parameters``."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, RopeScaling()
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings", 8192)
        ),
    )


def _gguf_rope(get: Any) -> RopeScaling:
    """GGUF stores llama3 scaling as a ``rope_freqs`` tensor (handled by the loader), so only
    "linear" scaling is read from metadata here."""
    rope_type = get("rope.scaling.type") or "none"
    if rope_type in ("none", ""):
        return RopeScaling()
    if rope_type != "linear":
        raise ValueError(f"GGUF rope scaling {rope_type!r} is not supported")
    return RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
