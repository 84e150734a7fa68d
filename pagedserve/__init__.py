"""pagedserve: distributed LLM serving on PagedAttention."""

from __future__ import annotations

from typing import Any

__all__ = ["LLM", "make_sampling_params"]


def __getattr__(name: str) -> Any:  # lazy: importing pagedserve must not load torch
    if name == "LLM":
        from pagedserve.llm import LLM

        return LLM
    if name == "make_sampling_params":
        from pagedserve.core.sampling import make_sampling_params

        return make_sampling_params
    raise AttributeError(name)
