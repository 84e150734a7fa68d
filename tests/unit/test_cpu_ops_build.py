"""How the C++ kernel build is cached (``worker.kernels.cpu_ops._build``), without compiling:
the compiler is replaced. A build that was killed is tried again next time; one that failed is
remembered (so every process does not spend minutes on it again); the build compiles a copy of
the sources in the cache folder, so checkouts at different paths share one build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.utils.cpp_extension

from worker.kernels import cpu_ops


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cpu_ops.ENV_ENABLE, raising=False)
    return tmp_path / "pagedserve" / "cpu_ops" / f"pagedserve_cpu_ops_{cpu_ops._fingerprint()}"


def _compiler(monkeypatch: pytest.MonkeyPatch, error: str, seen: list[dict]) -> None:
    def load(**kwargs: object) -> None:
        seen.append(kwargs)
        raise RuntimeError(error)

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)


def test_a_killed_build_is_retried_and_a_failed_one_remembered(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    _compiler(monkeypatch, "Error building extension: ninja: build stopped: interrupted by user.",
              seen)
    assert cpu_ops._build() is None
    assert not (cache / "BUILD_FAILED").exists()
    assert cpu_ops._build() is None and len(seen) == 2  # tried again
    _compiler(monkeypatch, "Error building extension: cpu_ops.cpp:1: error: expected ';'", seen)
    assert cpu_ops._build() is None
    assert "expected ';'" in (cache / "BUILD_FAILED").read_text()
    assert cpu_ops._build() is None and len(seen) == 3  # remembered: not compiled again


def test_the_build_compiles_a_copy_of_the_sources_in_the_cache(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []
    _compiler(monkeypatch, "interrupted", seen)
    cpu_ops._build()
    sources = [Path(p) for p in seen[0]["sources"]]  # type: ignore[union-attr]
    assert sources == [cache / "src" / "cpu_ops.cpp"]
    for name in cpu_ops._SOURCES:
        assert (cache / "src" / name).read_text() == (Path(cpu_ops.__file__).parent / name
                                                      ).read_text()
    assert seen[0]["extra_include_paths"] == [str(cache / "src")]
