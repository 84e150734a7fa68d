"""``CertificateFiles``: when a service takes up rotated certificate files, and when it keeps
the ones it has (``pagedserve.core.grpc_util``). Real certificates from ``pagedserve.certs``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pagedserve.certs import LocalCA, identity, write_local_pki
from pagedserve.core import file_watch, grpc_util
from pagedserve.core.grpc_util import CertificateFiles, TlsConfig


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TlsConfig:
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)
    return write_local_pki(tmp_path)["worker"]


def _write(path: str | None, data: bytes) -> None:
    """Replaces the file by rename, as the kubelet swaps a Secret's files: a new inode, so the
    change shows even where the size and the (coarse) mtime come out the same."""
    assert path is not None
    staged = Path(f"{path}.new")
    staged.write_bytes(data)
    staged.replace(path)


def test_unchanged_files_are_not_read_again(tls: TlsConfig) -> None:
    files = CertificateFiles(tls)
    assert not files.refresh() and not files.refresh()


def test_a_rotated_pair_and_bundle_are_taken_up_once(tls: TlsConfig) -> None:
    files = CertificateFiles(tls)
    ca = LocalCA("the next CA")
    issued = ca.issue(identity("worker"))
    _write(tls.cert_file, issued.cert_pem)
    _write(tls.key_file, issued.key_pem)
    _write(tls.ca_file, ca.cert_pem)
    assert files.refresh()
    assert (files.cert, files.key, files.ca) == (issued.cert_pem, issued.key_pem, ca.cert_pem)
    assert not files.refresh()


@pytest.mark.parametrize("broken", ["key of another pair", "half-written bundle",
                                    "missing certificate"])
def test_a_set_that_does_not_load_keeps_the_old_one_and_says_so_once(
        tls: TlsConfig, broken: str, caplog: pytest.LogCaptureFixture) -> None:
    files = CertificateFiles(tls)
    before = (files.cert, files.key, files.ca)
    if broken == "key of another pair":
        _write(tls.key_file, LocalCA().issue("x").key_pem)
    elif broken == "half-written bundle":
        assert files.ca is not None
        _write(tls.ca_file, files.ca[: len(files.ca) // 2])
    else:
        assert tls.cert_file is not None
        Path(tls.cert_file).unlink()
    with caplog.at_level(logging.WARNING, logger=grpc_util.__name__):
        assert not files.refresh() and not files.refresh()
    assert (files.cert, files.key, files.ca) == before
    assert len([r for r in caplog.records if "do not load" in r.getMessage()]) == 1


def test_files_are_looked_at_no_more_than_once_an_interval(
        tls: TlsConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    files = CertificateFiles(tls)
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 3600.0)
    ca = LocalCA("the next CA")
    _write(tls.ca_file, ca.cert_pem)
    assert not files.refresh()  # changed, but looked at less than an interval ago
    monkeypatch.setattr(file_watch, "CHECK_INTERVAL_S", 0.0)
    assert files.refresh() and files.ca == ca.cert_pem


def test_bad_files_at_start_are_an_error(tls: TlsConfig) -> None:
    _write(tls.key_file, LocalCA().issue("x").key_pem)
    with pytest.raises(ValueError, match="is not the key of"):
        CertificateFiles(tls)
