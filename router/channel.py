"""gRPC channels from the client commands to a sidecar: plaintext, or TLS trusting the CA
that ``$SPECROUTE_CA_FILE`` names (for a sidecar serving with ``tls.cert_file``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

#: A PEM file of the CA that signed a TLS sidecar's certificate: when set, the client
#: commands connect with TLS and trust it.
CA_FILE_ENV = "SPECROUTE_CA_FILE"


class ClientTlsError(ValueError):
    """``$SPECROUTE_CA_FILE`` names a file that cannot be read; the message is one line."""


def trusted_roots(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The CA certificates to trust (PEM), or None for a plaintext channel."""
    ca_file = environ.get(CA_FILE_ENV)
    if not ca_file:
        return None
    try:
        return Path(ca_file).read_bytes()
    except OSError as error:
        raise ClientTlsError(f"{CA_FILE_ENV}: {error}") from None


def sidecar_channel(
    address: str, roots: bytes | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to the sidecar at ``address``: TLS trusting ``roots`` when given."""
    if roots is None:
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(address, credentials, options=list(options))
