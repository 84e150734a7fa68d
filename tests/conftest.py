"""Fixtures for the whole suite.

``cpu_isa`` / ``ops``: a test that takes one runs once per instruction-set variant of the fused
CPU kernels that this CPU can execute (AVX-512, AVX2, portable), with ``PAGEDSERVE_CPU_ISA`` set
to it, so everything the test builds (models, samplers, backends) uses that variant. On an
AVX-512 machine the suite thereby covers what AVX2-only and ARM users run. With the kernels off
(``PAGEDSERVE_CPU_KERNELS=0``) a ``cpu_isa`` test runs once on the torch path (``None``) and an
``ops`` test is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from worker.kernels import cpu_ops

# Every variant this CPU runs; only the one PAGEDSERVE_CPU_ISA names when the suite runs pinned
# to one (the second pass of ``make test``).
CPU_ISAS = ([cpu_ops.selected_isa()] if os.environ.get(cpu_ops.ENV_ISA) and cpu_ops.library()
            else cpu_ops.available_isas())


@pytest.fixture(params=CPU_ISAS or [None], ids=lambda isa: isa or "kernels-off")
def cpu_isa(request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[str | None]:
    if request.param is not None:
        monkeypatch.setenv(cpu_ops.ENV_ISA, request.param)
    yield request.param


@pytest.fixture
def ops(cpu_isa: str | None) -> ModuleType:
    if cpu_isa is None:
        pytest.skip("fused CPU kernels off (PAGEDSERVE_CPU_KERNELS=0) or not built")
    module = cpu_ops.load(cpu_isa)
    assert module is not None and module.isa == cpu_isa
    return module
