"""Fused fp32 CPU kernels (``cpu_ops.cpp``): paged decode and prefill attention, RMSNorm,
in-place RoPE, SwiGLU's silu(gate) * up, and the dense projections (``packed_linear`` over
weights packed by ``pack_weight``).

Built on first use with ``torch.utils.cpp_extension.load_inline`` into a per-user cache folder
(keyed by the source, the flags and the CPU's instruction set, so a cached build is never loaded
on a machine it was not compiled for). Building takes about a minute once; later processes load
the cached library in well under a second.

``load()`` returns the module, or ``None`` when it cannot be built (no compiler, no ninja, a
build error, ``PAGEDSERVE_CPU_KERNELS=0``): every caller then keeps its torch path, which
computes the same thing. The torch reference and these kernels are compared in
``tests/kernels/test_cpu_ops.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_ops.cpp")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
PANEL = 48  # output columns per packed panel; must equal PANEL in cpu_ops.cpp

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False


def load() -> ModuleType | None:
    """The compiled module, built once per process (thread-safe); ``None`` if unavailable."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            _module = _build()
            _tried = True
    return _module


def _build() -> ModuleType | None:
    if os.environ.get("PAGEDSERVE_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        source = _SOURCE.read_text()
        name = f"pagedserve_cpu_ops_{_fingerprint(source)}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
    except Exception as exc:  # no torch extension support, no writable cache
        logger.warning("fused CPU kernels unavailable, using the torch path: %s", exc)
        return None
    failed = build_dir / "BUILD_FAILED"
    if failed.exists():  # remembered, so every process does not spend the build time again
        logger.info("fused CPU kernels unavailable (earlier build failed; delete %s to retry)",
                    build_dir)
        return None
    try:
        return load_inline(name=name, cpp_sources=[source],  # bindings: end of the .cpp
                           extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build_dir), verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: use the torch path
        logger.warning("fused CPU kernels unavailable, using the torch path: %s", exc)
        failed.write_text(str(exc))
        return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` weight ``[N, K]`` -> the panel layout ``packed_linear`` reads:
    ``[ceil(N / 48), K, 48]`` with ``packed[p, k, j] = weight[48 p + j, k]``, zero padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def _fingerprint(source: str) -> str:
    h = hashlib.sha256()
    for part in (source, " ".join(_FLAGS), torch.__version__, platform.machine(), _cpu_flags()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedserve" / "cpu_ops"
