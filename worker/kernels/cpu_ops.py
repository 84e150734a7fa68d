"""Fused fp32 CPU kernels (``cpu_ops.cpp``): paged decode and prefill attention, RMSNorm,
in-place RoPE, SwiGLU's silu(gate) * up, the dense projections (``packed_linear`` over weights
packed by ``pack_weight``), greedy sampling, and a whole decoder stack in one call.

One library holds every variant: ``avx512``, ``avx2`` (AVX2 + FMA) and ``portable`` (any CPU,
aarch64 included; on other than x86-64 with GCC it is the only one). ``load()`` returns the
variant this process uses: ``PAGEDSERVE_CPU_ISA`` when set (an error if this CPU cannot run it),
else the best one the CPU supports. ``load(isa)`` returns a given variant (the tests compare each
against the torch reference). ``PAGEDSERVE_CPU_KERNELS=0`` turns them off: every caller then
keeps its torch path, which computes the same thing.

The library is built with ``torch.utils.cpp_extension`` into a per-user cache folder keyed by the
sources and flags; ``make run``/``make test`` build it at install time (``python -m
worker.kernels.cpu_ops``), so a first ``pagedserve up`` does not wait for the compiler (about two
minutes on 2 cores). Later processes load the cached library in well under a second.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_SOURCES = ("cpu_ops.cpp", "cpu_kernels.h", "cpu_simd.h")
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
PANEL = 48  # output columns per packed panel; must equal PANEL in cpu_kernels.h
ISAS = ("avx512", "avx2", "portable")  # best first
ENV_ISA = "PAGEDSERVE_CPU_ISA"
ENV_ENABLE = "PAGEDSERVE_CPU_KERNELS"

_lock = threading.Lock()
_library: ModuleType | None = None
_tried = False
_chosen: dict[str, ModuleType] = {}  # PAGEDSERVE_CPU_ISA's value -> the variant load() gives


def library() -> ModuleType | None:
    """The compiled library (every variant), built once per process (thread-safe); ``None`` if
    turned off or it cannot be built."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            _library = _build()
            _tried = True
    return _library


def available_isas() -> list[str]:
    """The variants this CPU can run, best first; ``[]`` when the kernels are off or unbuilt."""
    lib = library()
    return [] if lib is None else [isa for isa in ISAS
                                   if hasattr(lib, isa) and lib.cpu_supports(isa)]


def selected_isa() -> str | None:
    """The variant ``load()`` returns: ``PAGEDSERVE_CPU_ISA`` if set, else the best available;
    ``None`` when the kernels are off or unbuilt. Raises ``ValueError`` if the variant asked for
    is unknown or cannot run on this CPU (never a silent fall-back to a slower one)."""
    available = available_isas()
    if not available:
        return None
    wanted = os.environ.get(ENV_ISA, "").strip().lower()
    if wanted in ("", "auto"):
        return available[0]
    if wanted not in ISAS:
        raise ValueError(f"{ENV_ISA}={wanted!r}: want one of {', '.join(ISAS)} or auto")
    if wanted not in available:
        raise ValueError(f"{ENV_ISA}={wanted}: this CPU runs only {', '.join(available)}")
    return wanted


def load(isa: str | None = None) -> ModuleType | None:
    """The kernels of variant ``isa`` (default: ``selected_isa()``), or ``None`` when the kernels
    are off or unbuilt. The module has the same functions whatever the variant. Called on every
    forward pass, so the default's answer is kept per value of ``PAGEDSERVE_CPU_ISA``."""
    lib = library()
    if lib is None:
        return None
    if isa is None:
        wanted = os.environ.get(ENV_ISA, "")
        module = _chosen.get(wanted)
        if module is None:
            isa = selected_isa()
            module = _chosen[wanted] = getattr(lib, str(isa))  # the worker logs the choice
        return module
    if isa not in available_isas():
        raise ValueError(f"cpu kernels: {isa} cannot run here (this CPU runs "
                         f"{', '.join(available_isas()) or 'none'})")
    return getattr(lib, str(isa))


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear`` weight ``[N, K]`` -> the panel layout ``packed_linear`` reads:
    ``[ceil(N / 48), K, 48]`` with ``packed[p, k, j] = weight[48 p + j, k]``, zero padded."""
    n, k = weight.shape
    panels = -(-n // PANEL)
    padded = torch.zeros(panels * PANEL, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    return padded.view(panels, PANEL, k).transpose(1, 2).contiguous()


def _build() -> ModuleType | None:
    if os.environ.get(ENV_ENABLE, "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        name = f"pagedserve_cpu_ops_{_fingerprint()}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
    except Exception as exc:  # no torch extension support, no writable cache
        logger.warning("fused CPU kernels unavailable, using the torch path: %s", exc)
        return None
    failed = build_dir / "BUILD_FAILED"
    if failed.exists():  # remembered, so every process does not spend the build time again
        logger.warning("fused CPU kernels unavailable, using the torch path (earlier build "
                       "failed; delete %s to retry)", build_dir)
        return None
    if not any(build_dir.glob(f"{name}*.so")):
        logger.warning("building the fused CPU kernels (once, about two minutes) in %s",
                       build_dir)
    # The build compiles a copy of the sources kept in the build folder: ninja tracks source
    # paths, so checkouts at different paths (with the same sources, hence the same folder)
    # would otherwise rebuild each other's library back and forth.
    sources = _copy_sources(build_dir)
    try:
        return load_extension(name=name, sources=[str(sources / "cpu_ops.cpp")],
                              extra_include_paths=[str(sources)], extra_cflags=_FLAGS,
                              extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                              verbose=False)
    except Exception as exc:  # no compiler, no ninja, a build error: use the torch path
        logger.warning("fused CPU kernels unavailable, using the torch path: %s", exc)
        if "interrupted" not in str(exc):  # a killed build is not a broken one: retry next time
            failed.write_text(str(exc))
        return None


def _copy_sources(build_dir: Path) -> Path:
    """The kernel sources, copied into ``build_dir/src`` (rewritten only when they differ, so an
    existing build stays up to date)."""
    dest = build_dir / "src"
    dest.mkdir(exist_ok=True)
    for source in _SOURCES:
        text = (_DIR / source).read_text()
        target = dest / source
        if not target.exists() or target.read_text() != text:
            tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(target)  # atomic: a concurrent build never reads half a file
    return dest


def _fingerprint() -> str:
    h = hashlib.sha256()
    for part in (*[(_DIR / s).read_text() for s in _SOURCES], " ".join(_FLAGS),
                 torch.__version__, platform.machine()):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagedserve" / "cpu_ops"


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.kernels.cpu_ops``: build the kernels now (the install step) and say
    which variant this machine will use."""
    parser = argparse.ArgumentParser(prog="python -m worker.kernels.cpu_ops",
                                     description=main.__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    if library() is None:
        print("pagedserve: fused CPU kernels NOT available (see the warning above); workers will "
              "use the slower torch ops", file=sys.stderr)
        return 0
    print(f"pagedserve: fused CPU kernels ready ({time.perf_counter() - start:.0f}s); this CPU "
          f"runs {', '.join(available_isas())}; workers use {selected_isa()} "
          f"({ENV_ISA} chooses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
