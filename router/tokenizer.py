"""The router's tokenizer: text <-> token ids, and chat templates, for one served model.

``load_tokenizer`` reads either a Hugging Face directory (``tokenizer.json`` plus
``tokenizer_config.json``) or a GGUF file, whose metadata holds the vocabulary, merges, token types
and chat template. Either way the result wraps a ``tokenizers.Tokenizer`` and produces the same ids
as ``transformers.AutoTokenizer`` does for the same files (the unit tests check this).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from router.chat_template import compile_chat_template, render_chat_template
from router.gguf_metadata import read_gguf_metadata

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_SPECIAL_TOKEN_TYPES = (3, 4)

_SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "pad")
# GGUF spells two of them out: tokenizer.ggml.<key>_token_id.
_GGUF_SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


@dataclass(frozen=True)
class Tokenizer:
    """One model's tokenizer. Immutable after load, so one instance serves every request.

    ``special_tokens`` maps ``bos_token``/``eos_token``/``unk_token``/``pad_token`` to their text
    (only those the model defines); the chat template sees them under those names.
    ``eos_token_ids`` are the ids that end generation (EOS plus e.g. an end-of-turn token)."""

    backend: HFTokenizer
    eos_token_ids: tuple[int, ...]
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model's post-processor adds
        (e.g. BOS for Llama; nothing for SmolLM2)."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (byte-level form, e.g. ``Ġworld``)."""
        return self.backend.id_to_token(token_id) or ""

    def apply_chat_template(
        self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Renders a conversation to prompt text. Raises ``ValueError`` if the model has no
        template; ``ChatTemplateError`` (an ``InvalidArgument``) if the template rejects the
        conversation."""
        if self.chat_template is None:
            raise ValueError("the model has no chat template")
        return render_chat_template(
            self.chat_template, list(messages),
            add_generation_prompt=add_generation_prompt, special_tokens=self.special_tokens,
        )

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation: the template already places every special token."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def load_tokenizer(model_path: str | Path) -> Tokenizer:
    """Loads the tokenizer of a ``.gguf`` file, or of an HF directory (``tokenizer.json``).

    A directory without ``tokenizer.json`` but with exactly one ``.gguf`` file loads that file."""
    path = Path(model_path)
    if path.is_dir() and not (path / "tokenizer.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path}: no tokenizer.json and not exactly one .gguf file")
        path = ggufs[0]
    tokenizer = _load_gguf(path) if path.is_file() else _load_hf_dir(path)
    if tokenizer.chat_template is not None:
        # A broken template fails at start, not per request.
        compile_chat_template(tokenizer.chat_template)
    logger.info(
        "tokenizer loaded from %s: vocab %d, eos %s, chat template %s",
        path, tokenizer.vocab_size, list(tokenizer.eos_token_ids), tokenizer.has_chat_template,
    )
    return tokenizer


# --- GGUF -----------------------------------------------------------------------------------------


def _load_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' BPE)"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    backend = _gguf_bpe(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre"))
    token_types = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind in enumerate(token_types) if kind in _SPECIAL_TOKEN_TYPES
    ])
    special_ids = {
        name: meta[f"tokenizer.ggml.{key}_token_id"]
        for name, key in _GGUF_SPECIAL_KEYS.items() if f"tokenizer.ggml.{key}_token_id" in meta
    }
    _set_post_processor(
        backend,
        tokens,
        special_ids.get("bos") if meta.get("tokenizer.ggml.add_bos_token") else None,
        special_ids.get("eos") if meta.get("tokenizer.ggml.add_eos_token") else None,
    )
    eos_ids = [special_ids[n] for n in ("eos",) if n in special_ids]
    eos_ids += [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                if k in meta and meta[k] not in eos_ids]
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(eos_ids),
        special_tokens={f"{name}_token": tokens[i] for name, i in special_ids.items()},
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _gguf_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    """A byte-level BPE over the GGUF vocabulary. ``pre`` (``tokenizer.ggml.pre``) picks how text
    is split before BPE, as in the model's original ``tokenizer.json``."""
    vocab = {token: i for i, token in enumerate(tokens)}
    merge_pairs = [_merge_pair(m) for m in merges]
    backend = HFTokenizer(BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM2's tokenizer.json: every digit is its own pre-token.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        if pre not in (None, "default", "gpt2"):
            logger.warning("GGUF pre-tokenizer %r unknown; using GPT-2 byte-level splitting", pre)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _merge_pair(merge: str) -> tuple[str, str]:
    left, right = merge.split(" ", 1)
    return left, right


def _set_post_processor(
    backend: HFTokenizer, tokens: list[str], bos_id: int | None, eos_id: int | None
) -> None:
    """``add_special_tokens=True`` adds BOS/EOS only where the GGUF asks for them."""
    head = [(tokens[bos_id], bos_id)] if bos_id is not None else []
    tail = [(tokens[eos_id], eos_id)] if eos_id is not None else []
    single = " ".join([t for t, _ in head] + ["$A"] + [t for t, _ in tail])
    pair = " ".join([t for t, _ in head] + ["$A"] + [t for t, _ in tail]
                    + [t for t, _ in head] + ["$B:1"] + [t for t, _ in tail])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=head + tail
    )


# --- Hugging Face directory -----------------------------------------------------------------------


def _load_hf_dir(path: Path) -> Tokenizer:
    backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    config = _read_json(path / "tokenizer_config.json")
    special_tokens = {
        f"{name}_token": text
        for name in _SPECIAL_TOKEN_NAMES
        if (text := _token_text(config.get(f"{name}_token"))) is not None
    }
    return Tokenizer(
        backend=backend,
        eos_token_ids=tuple(_hf_eos_ids(path, backend, special_tokens.get("eos_token"))),
        special_tokens=special_tokens,
        chat_template=_hf_chat_template(path, config),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: HF uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _hf_eos_ids(path: Path, backend: HFTokenizer, eos_text: str | None) -> list[int]:
    """EOS from the tokenizer config plus any ``eos_token_id`` in generation_config.json."""
    ids: list[int] = []
    if eos_text is not None and (eos_id := backend.token_to_id(eos_text)) is not None:
        ids.append(eos_id)
    extra = _read_json(path / "generation_config.json").get("eos_token_id")
    for value in extra if isinstance(extra, list) else [extra]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids
