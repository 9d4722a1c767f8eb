"""The server's TLS certificate, read again when its files change.

Certificate managers (cert-manager, a Vault agent, a Kubernetes secret volume) renew a
certificate by replacing its files; a server that read them once at start serves the old
certificate until it expires, and every client then fails. The sidecar checks the files'
stamps (size, modification time, inode: a secret volume swaps a symlink) before each new
gRPC connection (``grpc.dynamic_ssl_server_credentials`` asks before every handshake) and
every ``tls.reload_interval_s`` for the HTTP fronts and the metrics port, whose TLS context
is updated in place, on the event loop's thread (the one that makes their connections:
OpenSSL's context must not change while another thread copies it into a new connection).
Connections made from then on get the new certificate, open ones keep theirs. A new pair
that does not load (a key that does not match the certificate, a file caught half-written)
is logged once, and the previous pair keeps serving until the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from pathlib import Path

import grpc

from router.settings import TlsFilesError, TlsSettings

logger = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int, int], ...]


def _stamp(*files: Path) -> Stamp | None:
    """Each file's (size, mtime_ns, inode), its links followed; None while one is missing."""
    try:
        stats = [os.stat(file) for file in files]
    except OSError:
        return None
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def _load_pair(context: ssl.SSLContext, key: bytes, cert: bytes) -> None:
    """``context.load_cert_chain`` from bytes (it reads files only): a private copy of
    the pair, so that what the HTTP ports load is what gRPC is given."""
    with tempfile.TemporaryDirectory(prefix="specroute-tls-") as directory:
        key_file, cert_file = Path(directory) / "key.pem", Path(directory) / "cert.pem"
        with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as out:
            out.write(key)
        cert_file.write_bytes(cert)
        context.load_cert_chain(cert_file, key_file)


class ServerCertificate:
    """The certificate and key every port serves, and the TLS context of the HTTP ports.
    Made at start, it checks that both files read, parse and belong together
    (``TlsFilesError`` naming them when not): gRPC reports a bad pair only as a failure to
    bind the port."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp = _stamp(cert_file, key_file)
        self._pair = self._read()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load_into(self.context, self._pair)
        self.version = 0  # good pairs read since start
        self._grpc_version = self._context_version = 0

    @classmethod
    def from_settings(cls, tls: TlsSettings) -> ServerCertificate | None:
        if tls.cert_file is None or tls.key_file is None:
            return None
        return cls(tls.cert_file, tls.key_file)

    def _read(self) -> tuple[bytes, bytes]:
        try:
            return self.key_file.read_bytes(), self.cert_file.read_bytes()
        except OSError as error:
            raise TlsFilesError(f"tls: cannot read {error.filename}: {error.strerror}") from None

    def _load_into(self, context: ssl.SSLContext, pair: tuple[bytes, bytes]) -> None:
        try:
            _load_pair(context, *pair)
        except (OSError, ssl.SSLError) as error:
            raise TlsFilesError(
                f"tls: cannot use {self.cert_file} with {self.key_file}: {error}"
            ) from None

    def check_files(self) -> bool:
        """Read the files again if they changed since the last look (any thread); whether
        a new good pair was read (one that does not load is logged, the old one stays)."""
        stamp = _stamp(self.cert_file, self.key_file)
        with self._lock:
            if stamp is None or stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                pair = self._read()
                self._load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)
            except TlsFilesError as error:
                logger.error("%s; the previous certificate keeps serving", error)
                return False
            self._pair = pair
            self.version += 1
        logger.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    def update_context(self) -> None:
        """Put the last good pair into the HTTP ports' context if it has an older one; on
        the event loop's thread only (module doc)."""
        with self._lock:
            version, pair = self.version, self._pair
        if version != self._context_version:
            self._load_into(self.context, pair)
            self._context_version = version

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """gRPC's credentials, which ask for the current pair before each handshake."""
        key, cert = self._pair
        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(key, cert)]),
            self._grpc_configuration,
        )

    def _grpc_configuration(self) -> grpc.ServerCertificateConfiguration | None:
        """The pair for gRPC when it changed since gRPC last took one, else None (keep)."""
        try:
            self.check_files()
        except Exception:  # gRPC's core calls this: never let it fail a handshake
            logger.exception("TLS certificate check failed")
        with self._lock:
            if self._grpc_version == self.version:
                return None
            self._grpc_version = self.version
            key, cert = self._pair
        return grpc.ssl_server_certificate_configuration([(key, cert)])
