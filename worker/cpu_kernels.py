"""Which fused CPU kernel variant a worker runs, for its startup log line and its
``pagedserve_worker_cpu_kernels_info`` series.

``worker/kernels/cpu_ops.py`` builds one variant per instruction set (``cpu_ops.ISAS``: avx512,
avx2, portable) and picks the best one this CPU runs, or the one ``PAGEDSERVE_CPU_ISA`` names.
This module only reports that choice; it never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.kernels import cpu_ops

OFF = "off"  # a CPU worker on plain torch ops (kernels turned off, unbuildable, or not fp32)
NONE = "none"  # not a CPU worker: the fused CPU kernels do not apply


@dataclass(frozen=True)
class CpuKernels:
    """``isa``: the variant in use, ``off`` or ``none`` (above). ``available``: the variants this
    CPU can run, best first (empty when the kernels are off or failed to build)."""

    isa: str
    available: tuple[str, ...] = ()

    def describe(self) -> str:
        """One phrase for the log, e.g. ``avx2 (available: avx512, avx2, portable; ...)``."""
        if self.isa == NONE:
            return "none (not a CPU worker)"
        if self.isa == OFF:
            return "off: torch ops"
        available = ", ".join(self.available) or self.isa
        return f"{self.isa} (available: {available}; PAGEDSERVE_CPU_ISA to choose)"


def cpu_kernels(device: torch.device, dtype: torch.dtype) -> CpuKernels:
    """The variant a worker on ``device``/``dtype`` runs. Call it after the model is loaded: on
    fp32 CPU that load has already built (or failed to build) the kernels."""
    if device.type != "cpu":
        return CpuKernels(NONE)
    if dtype != torch.float32:  # the kernels are fp32 only; the model's layers use torch ops
        return CpuKernels(OFF)
    isa = cpu_ops.selected_isa()
    available = tuple(cpu_ops.available_isas())
    return CpuKernels(isa, available) if isa else CpuKernels(OFF, available)
