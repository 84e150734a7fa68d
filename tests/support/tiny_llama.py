"""A tiny random Llama with a real tokenizer, saved with the real writers, for fast tests.

``make_tiny_llama(path)`` writes ``config.json`` + ``model.safetensors`` (HF ``save_pretrained``)
and a byte-level BPE ``tokenizer.json`` trained on ``CORPUS`` to exactly the model's vocab size,
with ``<|endoftext|>`` (id 0, EOS), ``<|im_start|>`` (1) and ``<|im_end|>`` (2), plus a
``tokenizer_config.json`` carrying a ChatML chat template. Same arguments -> same files.

``tiny_llama_dir(**overrides)`` builds once per process (per distinct overrides) into a temp dir.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.15,  # larger than HF's 0.02 so logits are far from flat
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 0,
    "pad_token_id": 0,
}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged attention engine stores the keys and values
of every sequence in fixed-size blocks, much as an operating system maps virtual pages to physical
frames. Blocks need not be contiguous; a block table maps each logical block of a sequence to the
physical block that holds it. When a block fills, the scheduler allocates another one from the free
list. Sequences that share a prefix can share its blocks, and a block with more than one reader is
copied before anyone writes into it. When memory runs out, the most recently arrived request is
preempted: its blocks are swapped to host memory or simply dropped and recomputed later.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the
capital of France, and Berlin is the capital of Germany. Rome, Madrid, Lisbon and Vienna are old
cities with long histories. Water boils at one hundred degrees Celsius at sea level. The sun rises
in the east and sets in the west. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159.
Once upon a time there was a little robot who wanted to learn to write poems. Every morning it
read a book, every afternoon it wrote a line, and every evening it counted the stars in the sky.
Its friends were a cat named Pixel and an old lamp that hummed quietly whenever it was happy.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Mathematics, physics, chemistry and biology are sciences; music, painting and poetry are arts.
Tokenizers split text into pieces; the model predicts the next piece, one step at a time, and a
sampler chooses among the likely pieces with temperature, top-k, top-p and minimum probability.
"""


def train_tokenizer(vocab_size: int) -> Any:
    """Byte-level BPE trained on ``CORPUS`` to exactly ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer reached {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}: "
            "lengthen CORPUS"
        )
    return tokenizer


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    train_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 512,
        "chat_template": CHATML_TEMPLATE,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def make_tiny_llama(
    path: str | Path, seed: int = 0, architecture: str = "llama", **overrides: Any
) -> Path:
    """Saves a tiny random ``LlamaForCausalLM`` (+ tokenizer) to ``path``; returns ``path``.
    ``overrides`` are config fields (e.g. ``tie_word_embeddings=True``); ``architecture``
    "qwen2" saves a ``Qwen2ForCausalLM`` (q/k/v biases) instead."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prefix = {"llama": "Llama", "qwen2": "Qwen2"}[architecture]
    config = getattr(transformers, f"{prefix}Config")(**{**TINY_DEFAULTS, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make bias bugs visible
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, config.initializer_range)
    model.save_pretrained(path, safe_serialization=True)
    _save_tokenizer(path, config.vocab_size)
    return path


@functools.cache
def _cached(seed: int, overrides_json: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    return make_tiny_llama(root / "model", seed=seed, **json.loads(overrides_json))


def tiny_llama_dir(seed: int = 0, **overrides: Any) -> Path:
    """Built once per process per distinct arguments (a cheap session cache for tests)."""
    return _cached(seed, json.dumps(overrides, sort_keys=True))
