"""Renders a model's Jinja chat template the way Hugging Face ``apply_chat_template`` does.

Templates come with model files, so they are untrusted code: they run in jinja2's immutable sandbox.
The environment matches HF's (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson``
that does not HTML-escape, ``raise_exception``, ``strftime_now``) and the template sees the special
tokens (``bos_token``, ``eos_token``, ...) as HF passes them, so a prompt renders byte for byte
alike.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagedserve.core.errors import InvalidArgument


class ChatTemplateError(InvalidArgument):
    """The template refused the conversation (``raise_exception``) or failed to render it."""

    def __init__(self, message: str) -> None:
        super().__init__("prompt.chat", message)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles ``source`` once; templates are immutable, so the compiled form is shared."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(
    source: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    special_tokens: dict[str, str],
) -> str:
    """Renders ``messages`` (``[{"role": ..., "content": ...}]``) with the template ``source``.

    ``special_tokens`` maps ``bos_token``/``eos_token``/... to their text, as HF's
    ``special_tokens_map`` does. Raises ``ChatTemplateError`` if the template rejects the input."""
    try:
        template = compile_chat_template(source)
        return template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(str(exc)) from exc
