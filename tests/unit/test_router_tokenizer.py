"""The router's tokenizer (built from GGUF metadata) agrees with Hugging Face's on SmolLM2."""

from __future__ import annotations

import pytest

from pagedserve.core.errors import InvalidArgument
from pagedserve.core.models import default_model_path
from router.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

TEXTS = [
    "Hello world",
    " leading space",
    "trailing space ",
    "  two  spaces   three\t\ttabs\n\nnewlines\r\n",
    "12345 and 3.14159, 2024-01-01, x1y22z333, 1,000,000 and 007",
    "héllo wörld, naïve café, Ünïcödé",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👋🏽 👨‍👩‍👧 🚀🔥 flags 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep>",
    "Mixed CASE and don't can't won't I'm you're",
    "",
    "\u200b zero width \u00a0 nbsp",
    "a" * 300,
]

# Non-ASCII numerals after a space. SmolLM2's tokenizer.json (and llama.cpp's `smollm`
# pre-tokenizer) split every numeral off first; transformers' GGUF loader ignores
# `tokenizer.ggml.pre` and keeps " ¹" together, so there it yields "ĠÂ" + ... instead.
UNICODE_NUMERAL_TEXTS = [", ¹²³ and ½", "x ² y ٣ z Ⅻ"]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Write a haiku 🌸"},
        {"role": "assistant", "content": "Petals fall\nsoftly"},
        {"role": "user", "content": "Another, with\ttabs"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def hf_tokenizer():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf_gguf_tokenizer(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    for add_special_tokens in (True, False):
        expected = hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("text", UNICODE_NUMERAL_TEXTS)
def test_unicode_numerals_split_like_smollm2_tokenizer_json(
    tokenizer: Tokenizer, hf_tokenizer, text: str
) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    original = Backend.from_str(hf_tokenizer.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    assert tokenizer.encode(text) == original.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf_and_round_trips(tokenizer: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_and_eos_match_hf(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer)
    assert tokenizer.eos_token_ids == (hf_tokenizer.eos_token_id,)
    assert tokenizer.special_tokens["bos_token"] == hf_tokenizer.bos_token
    assert tokenizer.special_tokens["eos_token"] == hf_tokenizer.eos_token
    assert tokenizer.id_to_token(tokenizer.encode(" world")[0]) == "Ġworld"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(
    tokenizer: Tokenizer, hf_tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    hf_ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert tokenizer.encode_chat(messages) == list(hf_ids)


def test_chat_template_raise_exception_becomes_invalid_argument(tokenizer: Tokenizer) -> None:
    strict = Tokenizer(
        backend=tokenizer.backend, eos_token_ids=tokenizer.eos_token_ids,
        special_tokens=tokenizer.special_tokens,
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                      "{% endif %}{{ bos_token }}{{ messages[0]['content'] | tojson }}",
    )
    assert strict.apply_chat_template([{"role": "user", "content": "é<"}]) == '<|im_start|>"é<"'
    with pytest.raises(InvalidArgument, match="user first") as info:
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert info.value.field == "prompt.chat"


def test_chat_template_is_sandboxed(tokenizer: Tokenizer) -> None:
    evil = Tokenizer(
        backend=tokenizer.backend, eos_token_ids=(), special_tokens={},
        chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}",
    )
    with pytest.raises(InvalidArgument):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_directory_tokenizer_loads_template_and_eos(tmp_path, tokenizer: Tokenizer) -> None:
    import json

    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
        "chat_template": tokenizer.chat_template,
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token_ids == (2, 0)
    assert loaded.encode("Hello 123 👋") == tokenizer.encode("Hello 123 👋")
    messages = CONVERSATIONS[0]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
