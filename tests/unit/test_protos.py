"""The committed gRPC stubs are exactly what ``make proto`` generates from protos/*.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.external  # a service binary, the packaged model or a subprocess

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos" / "pagedserve" / "v1"


def test_stubs_do_not_drift_from_the_proto_files(tmp_path):
    (tmp_path / "protos" / "pagedserve").mkdir(parents=True)
    shutil.copytree(PROTO_DIR, tmp_path / "protos" / "pagedserve" / "v1",
                    ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in
                    (tmp_path / "protos" / "pagedserve" / "v1").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", *protos], cwd=tmp_path, check=True)
    generated = sorted((tmp_path / "protos" / "pagedserve" / "v1").glob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = PROTO_DIR / path.name
        assert committed.exists(), f"{path.name} is not committed: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{path.name} drifted: run `make proto`"
    committed_names = {p.name for p in PROTO_DIR.glob("*_pb2*.py*")}
    assert committed_names == {p.name for p in generated}, "stale stub files: run `make proto`"


def test_every_service_is_importable_with_package_qualified_imports():
    from protos.pagedserve.v1 import generation_pb2_grpc, scheduler_pb2_grpc, worker_pb2_grpc

    assert generation_pb2_grpc.GenerationStub
    assert scheduler_pb2_grpc.SchedulerStub
    assert worker_pb2_grpc.WorkerStub
