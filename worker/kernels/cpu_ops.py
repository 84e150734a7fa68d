"""Fused fp32 CPU kernels (``cpu_ops.cpp``): paged decode and prefill attention, RMSNorm,
in-place RoPE, SwiGLU's silu(gate) * up, the dense projections (``packed_linear`` over weights
packed by ``pack_weight``, or ``codes_linear`` over the exact 8-bit codes ``weight_codes`` finds
in weights dequantized from GGUF: the same bits from a third of the bytes), greedy sampling, and
a whole decoder stack in one call.

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
ENV_CODES = "PAGEDSERVE_CPU_WEIGHT_CODES"
CODE_BLOCK = 32  # k positions sharing one scale and offset; must equal CODE_BLOCK in cpu_kernels.h

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


def weight_codes_enabled() -> bool:
    """Whether projections that have exact 8-bit codes are held as them instead of fp32 panels
    (``PAGEDSERVE_CPU_WEIGHT_CODES``, default on; ``0``: fp32 panels for every projection)."""
    return os.environ.get(ENV_CODES, "1").strip() != "0"


def weight_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An fp32 ``nn.Linear`` weight ``[N, K]`` as the 8-bit codes ``codes_linear`` reads, or
    ``None`` when it has no exact such form.

    Weights dequantized from GGUF's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are, per output row and
    block of 32 along k, ``scale * code + offset`` with integer codes (0..255 once shifted by
    the block's minimum). This finds a scale and offset per block, checks that ``scale * code``
    is exact in fp32 and that ``scale * code + offset`` rebuilds every weight exactly (so the
    kernel's fused multiply-add, one rounding, gives the same fp32 weight; a -0.0 may come back
    as +0.0, which no sum from a +0.0 start tells apart), and packs ``codes [ceil(N / 48), K,
    48]`` uint8 like ``pack_weight``'s panels and ``scales [ceil(N / 48), K / 32, 2, 48]``
    (scale, offset). A weight with a block that does not rebuild exactly (trained fp32 weights,
    K-quants' two-level scales) gets ``None`` and keeps its fp32 panels.
    """
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % CODE_BLOCK or n == 0:
        return None
    x = weight.detach().reshape(-1, CODE_BLOCK)
    lo = x.amin(dim=1, keepdim=True)
    hi = x.amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        return None
    absmax = torch.maximum(hi.abs(), lo.abs())
    scale = torch.zeros_like(lo)
    codes = torch.zeros(x.shape, dtype=torch.uint8)
    pending = torch.ones(x.shape[0], dtype=torch.bool)

    def fit(d: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For blocks ``idx`` with scales ``d``: which rebuild exactly, and their codes."""
        m, xs = lo[idx], x[idx]
        q = ((xs - m) / torch.where(d > 0, d, torch.ones_like(d))).round_()
        q = torch.where(d > 0, q, torch.zeros_like(q))
        fits = (q >= 0).all(dim=1) & (q <= 255).all(dim=1)
        q = q.clamp_(0, 255)
        product = d * q  # must be exact, so the kernel's fused multiply-add rounds only once
        exact = product.double() == d.double() * q.double()
        rebuilt = (product + m) == xs  # -0.0 == 0.0: a sum cannot tell them apart here
        return (rebuilt & exact).all(dim=1) & fits, q

    # Q4_1 / Q5_1: (max - min) / 15 or 31 (fp16 scales); Q8_0: absmax / 127; Q4_0 / Q5_0:
    # absmax / 8 or 16. The candidate that fits most of a sample of blocks goes first (one full
    # pass, usually).
    cands = [c for raw in ((hi - lo) / 15, (hi - lo) / 31, absmax / 127, absmax / 8, absmax / 16)
             for c in (raw.half().float(), raw)]
    sample = torch.arange(min(256, x.shape[0]))
    sample_fits = [fit(c[sample], sample)[0] for c in cands]
    if not bool(torch.stack(sample_fits).any(dim=0).all()):
        return None  # a block of the sample fits no candidate: not a coded weight
    order = sorted(range(len(cands)), key=lambda i: -int(sample_fits[i].sum()))
    cands = [cands[i] for i in order]
    for cand in cands:
        idx = pending.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        exact, q = fit(cand[idx], idx)
        done = idx[exact]
        scale[done] = cand[done]
        codes[done] = q[exact].to(torch.uint8)
        pending[done] = False
    if bool(pending.any()):
        return None
    blocks = k // CODE_BLOCK
    offset = lo.view(n, blocks)
    scales = torch.stack((pack_weight(scale.view(n, blocks)), pack_weight(offset)), dim=2)
    return pack_weight(codes.view(n, k)), scales  # [P, K, 48], [P, K / 32, 2, 48]


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
