"""gRPC channels from the client commands to a sidecar: plaintext, or TLS trusting the CA
that ``$SPECROUTE_CA_FILE`` names (for a sidecar serving with ``tls.cert_file``), checking
the certificate against ``$SPECROUTE_TLS_SERVER_NAME`` when the address is not a name the
certificate holds (an IP address, a load balancer)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

#: A PEM file of the CA that signed a TLS sidecar's certificate: when set, the client
#: commands connect with TLS and trust it.
CA_FILE_ENV = "SPECROUTE_CA_FILE"
#: The name the sidecar's certificate must hold, when it is not the address's host.
SERVER_NAME_ENV = "SPECROUTE_TLS_SERVER_NAME"


def checked_address(address: str) -> str:
    """``address`` when it is ``host:port`` (an IPv6 host in brackets), else ValueError:
    gRPC read "127.0.0.1" as port 443, port 99999 modulo 65536, "http://h:1" as a name,
    and "" failed inside its resolver, each only once the call was made."""
    host, _, port = address.strip().rpartition(":")
    if "://" in address or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (a port of 1-65535, no scheme)")
    return address.strip()


def checked_token(token: str | None) -> str | None:
    """A bearer token as a header carries it: surrounding whitespace dropped (a secret
    file's newline: the sidecar strips its own too), else ValueError for characters a
    header cannot hold (grpc failed the call as INTERNAL "Invalid metadata")."""
    if token is None:
        return None
    token = token.strip()
    if any(not 32 < ord(character) < 127 for character in token):
        raise ValueError("the token holds characters a header cannot carry (printable ASCII)")
    return token or None


class ClientTlsError(ValueError):
    """The client's TLS variables cannot be used (a CA file that cannot be read, a server
    name without a CA); the message is one line."""


@dataclass(frozen=True)
class ClientTls:
    """What a client channel trusts: the CA certificates (PEM), and the name the server's
    certificate is checked against (None: the address's host)."""

    roots: bytes
    server_name: str | None = None


def client_tls(environ: Mapping[str, str] = os.environ) -> ClientTls | None:
    """The client's TLS from ``$SPECROUTE_CA_FILE`` and ``$SPECROUTE_TLS_SERVER_NAME``, or
    None for a plaintext channel."""
    ca_file = environ.get(CA_FILE_ENV)
    server_name = environ.get(SERVER_NAME_ENV) or None
    if not ca_file:
        if server_name:
            raise ClientTlsError(f"{SERVER_NAME_ENV} is set but {CA_FILE_ENV} is not")
        return None
    try:
        roots = Path(ca_file).read_bytes()
    except OSError as error:
        raise ClientTlsError(f"{CA_FILE_ENV}: {error}") from None
    if b"-----BEGIN CERTIFICATE-----" not in roots:  # grpc failed each call's handshake
        raise ClientTlsError(f"{CA_FILE_ENV}: {ca_file} holds no PEM certificate")
    return ClientTls(roots, server_name)


def sidecar_channel(
    address: str, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to the sidecar at ``address``: TLS as ``tls`` says when given."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.roots)
    if tls.server_name:
        options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
    return grpc.secure_channel(address, credentials, options=list(options))
