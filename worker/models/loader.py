"""``load_model``: a Llama-family model from an HF safetensors directory or a GGUF file.

The model is built on the ``meta`` device (no random init, no double allocation), materialised
empty on the target device, then every parameter is filled from the checkpoint; a parameter left
unfilled is an error.

GGUF notes: quantized tensors are dequantized to fp32 with ``gguf.quants.dequantize``. llama.cpp's
converter permutes the rows of Llama Q and K weights into an interleaved-RoPE layout; we undo that
exactly as transformers' GGUF loader does (``reverse_permute``) so outputs match HF.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.models.config import ModelConfig
from worker.models.llama import AttentionBackend, LlamaForCausalLM
from worker.models.sharding import TensorShard, shard_config, shard_weights

logger = logging.getLogger(__name__)

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: str | torch.device,
    backend: AttentionBackend | None = None,
    shard: TensorShard | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Loads weights into an eval-mode model on ``device``. ``backend`` defaults to torch. The
    model holds the checkpoint's weights as loaded: how it runs (packing the projections for the
    C++ kernels) is the model runner's choice (``worker/models/execution.py``). With ``shard``
    (a tensor-parallel rank) the model is that rank's slice, cut from the full tensors as they
    are read (``worker/models/sharding.py``; ``model.config`` is the slice's shape). Returns the
    model and the whole model's config."""
    path = Path(path)
    shard = shard or TensorShard()
    if backend is None:
        from worker.attention.torch_backend import TorchAttentionBackend

        backend = TorchAttentionBackend()
    if path.is_file() and path.suffix == ".gguf":
        model, config = _load_gguf(path, dtype, torch.device(device), backend, shard)
    elif path.is_dir() and (path / "config.json").exists():
        model, config = _load_hf_dir(path, dtype, torch.device(device), backend, shard)
    else:
        raise ValueError(f"model {path}: expected a .gguf file or a directory with config.json")
    return model, config


def build_empty_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
    shard: TensorShard | None = None,
) -> LlamaForCausalLM:
    """The model (``shard``'s slice of it) on ``device``, its parameters uninitialised."""
    shard = shard or TensorShard()
    with torch.device("meta"):
        model = LlamaForCausalLM(shard_config(config, shard), backend, shard.computes_logits)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.reset_buffers()
    return model.eval()


def _load_hf_dir(
    path: Path, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
    shard: TensorShard,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    config = ModelConfig.from_hf_dir(path)
    model = build_empty_model(config, dtype, device, backend, shard)
    with torch.no_grad():
        model.load_weights(shard_weights(_iter_safetensors(path), config, shard))
    logger.info("loaded %s from %s (%s, %s%s)", config.name, path, dtype, device,
                _describe(shard))
    return model, config


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {path}: no *.safetensors files")
    return files


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


# ---------------------------------------------------------------------------------------- GGUF


def _describe(shard: TensorShard) -> str:
    return "" if shard.size == 1 else f", tensor-parallel rank {shard.rank} of {shard.size}"


def _load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, backend: AttentionBackend,
    shard: TensorShard,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = gguf_fields(reader)
    tensor_names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_fields(fields, tensor_names, name=path.stem)
    model = build_empty_model(config, dtype, device, backend, shard)
    with torch.no_grad():
        permute_qk = fields["general.architecture"] == "llama"  # Qwen2 GGUFs are unpermuted
        model.load_weights(shard_weights(_iter_gguf(reader, config, permute_qk), config, shard))
        rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        if rope_freqs is not None:
            model.rotary.reset_buffers(torch.from_numpy(_dequantize(rope_freqs).reshape(-1)))
    logger.info("loaded %s from %s (%s, %s%s)", config.name, path, dtype, device,
                _describe(shard))
    return model, config


def gguf_fields(reader: Any) -> dict[str, Any]:
    """Scalar and small-array metadata as Python values (token lists are skipped: large, and
    only the tokenizer needs them, except for their count)."""
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        try:
            fields[key] = field.contents()
        except Exception as exc:  # noqa: BLE001 - exotic field types are not needed here
            logger.debug("skipping GGUF field %s: %s", key, exc)
    if "tokenizer.ggml.tokens" in reader.fields:
        fields["tokenizer.ggml.tokens"] = range(len(reader.fields["tokenizer.ggml.tokens"].data))
    return fields


def _dequantize(tensor: Any) -> np.ndarray:
    """fp32 array in the PyTorch ``[out, in]`` orientation (GGUF lists dims innermost first)."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def reverse_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute``: per head, rows ``[d0 d2 d4 ... d1 d3 ...]`` (interleaved
    pairs) back to HF's half-split layout. Same as transformers' ``_reverse_permute_weights``."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def _gguf_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if parts[0] != "blk" or len(parts) != 4 or parts[2] not in _GGUF_LAYER_NAMES:
        return None
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"


def _iter_gguf(
    reader: Any, config: ModelConfig, permute_qk: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in reader.tensors:
        hf_name = _gguf_hf_name(tensor.name)
        if hf_name is None:
            if tensor.name != "rope_freqs.weight":
                logger.debug("skipping GGUF tensor %s", tensor.name)
            continue
        array = _dequantize(tensor)
        if permute_qk and ".attn_q." in tensor.name:
            array = reverse_permute(array, config.num_heads)
        elif permute_qk and ".attn_k." in tensor.name:
            array = reverse_permute(array, config.num_kv_heads)
        if not array.flags.writeable:  # F32 tensors come memory-mapped read-only
            array = array.copy()
        yield hf_name, torch.from_numpy(np.ascontiguousarray(array))
