"""``worker.cpu_kernels``: the CPU kernel variant a worker reports (startup log line and
``pagedserve_worker_cpu_kernels_info``), with ``cpu_ops`` faked, and once for real."""

from __future__ import annotations

import torch

from worker import cpu_kernels as module
from worker.cpu_kernels import CpuKernels, cpu_kernels

CPU = torch.device("cpu")


def _never_load() -> None:
    raise AssertionError("cpu_ops.load() must not be called here")


def test_a_cuda_worker_reports_none_without_building_the_kernels(monkeypatch) -> None:
    monkeypatch.setattr(module.cpu_ops, "load", _never_load)
    assert cpu_kernels(torch.device("cuda", 0), torch.bfloat16) == CpuKernels("none")


def test_a_cpu_worker_that_is_not_fp32_runs_torch_ops(monkeypatch) -> None:
    monkeypatch.setattr(module.cpu_ops, "load", _never_load)
    assert cpu_kernels(CPU, torch.bfloat16) == CpuKernels("off")


def test_the_selected_isa_and_the_available_ones_come_from_cpu_ops(monkeypatch) -> None:
    monkeypatch.setattr(module.cpu_ops, "selected_isa", lambda: "avx2")
    monkeypatch.setattr(module.cpu_ops, "available_isas",
                        lambda: ["avx512", "avx2", "portable"])
    kernels = cpu_kernels(CPU, torch.float32)
    assert kernels == CpuKernels("avx2", ("avx512", "avx2", "portable"))
    assert kernels.describe() == (
        "avx2 (available: avx512, avx2, portable; PAGEDSERVE_CPU_ISA to choose)")


def test_no_selected_isa_means_torch_ops(monkeypatch) -> None:
    monkeypatch.setattr(module.cpu_ops, "selected_isa", lambda: None)
    monkeypatch.setattr(module.cpu_ops, "available_isas", lambda: [])
    kernels = cpu_kernels(CPU, torch.float32)
    assert kernels == CpuKernels("off")
    assert kernels.describe() == "off: torch ops"


def test_the_real_kernels_report_the_variant_chosen_by_environment(cpu_isa) -> None:
    """Not faked: the worker reports what ``PAGEDSERVE_CPU_ISA`` selects, on every variant."""
    from worker.kernels import cpu_ops

    kernels = cpu_kernels(CPU, torch.float32)
    assert kernels.available == tuple(cpu_ops.available_isas())
    assert kernels.isa == (cpu_isa or "off")
