"""The server certificate read again when its files change (router.certificates)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from router.certificates import ServerCertificate
from router.settings import TlsFilesError
from tests.router.conftest import self_signed_tls

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def test_a_changed_pair_is_read_and_the_last_good_one_kept(tmp_path: Path) -> None:
    old, new = self_signed_tls(_made(tmp_path / "old")), self_signed_tls(_made(tmp_path / "new"))
    live = _made(tmp_path / "live")
    cert, key = live / "server.crt", live / "server.key"
    shutil.copy(old.cert_file, cert)
    shutil.copy(old.key_file, key)
    certificate = ServerCertificate(cert, key)
    assert not certificate.check_files()  # unchanged: nothing read
    shutil.copy(new.key_file, key)
    shutil.copy(new.cert_file, cert)
    assert certificate.check_files() and certificate.version == 1
    assert certificate._pair == (new.key_file.read_bytes(), new.cert_file.read_bytes())
    shutil.copy(old.cert_file, cert)  # the new key with the old certificate: no pair
    assert not certificate.check_files() and certificate.version == 1
    assert certificate._pair[1] == new.cert_file.read_bytes()  # the last good pair serves
    cert.unlink()  # mid-swap: a file missing is no change yet
    assert not certificate.check_files()
    shutil.copy(new.cert_file, cert)
    assert certificate.check_files() and certificate.version == 2
    assert certificate._context_version == 0  # the HTTP ports' context: on the loop only
    certificate.update_context()
    assert certificate._context_version == 2


def test_a_pair_that_does_not_load_at_start_is_refused(tmp_path: Path) -> None:
    files = self_signed_tls(_made(tmp_path / "tls"))
    with pytest.raises(TlsFilesError, match="tls: cannot use"):
        ServerCertificate(files.ca_file, files.key_file)


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True)
    return directory
