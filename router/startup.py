"""What a sidecar's start refuses before anything heavy is imported or loaded: TLS files
that do not make a pair, a port it cannot listen on, a state directory it cannot use or
that another sidecar holds, a world directory with no world. ``specroute serve`` checks
these first (``check_start``), so that each is said in one line within a second, not after
the seconds torch and transformers take to import; ``start_sidecar`` checks them again
(an embedder calls it directly, and a port can be taken between the two)."""

from __future__ import annotations

import errno
import logging
import socket

from router.bundle import BundleNotFoundError, ModelBundle
from router.certificates import ServerCertificate
from router.errors import ListenError
from router.settings import Settings, host_port
from router.store import SidecarStore

logger = logging.getLogger(__name__)


class ModelDirError(ValueError):
    """A configured model directory that is not one (missing, or a file); the message
    names the setting."""


def check_start(settings: Settings) -> None:
    """Raise what the start would stop on before loading a model: ``TlsFilesError``,
    ``ListenError``, ``StateStoreError`` (the directory is opened, locked and closed
    again), ``ModelDirError`` (a configured model directory is not one),
    ``BundleNotFoundError`` (a world is used and there is none)."""
    ServerCertificate.from_settings(settings.tls)
    check_ports_free(settings)
    SidecarStore(settings.state_dir, exclusive=True).close()
    check_model_dirs(settings)
    if settings.uses_world():
        try:
            ModelBundle.load(settings.world_path())
        except BundleNotFoundError as error:
            if settings.target_dir is None or settings.world_dir is not None:
                raise
            # Your own target_dir alone: a bundle is still read for its classifier.
            raise BundleNotFoundError(
                f"{error}; or, serving your own target_dir, set classifier_dir too (without "
                "it the bundle's classifier and model drafters are used)"
            ) from None


def check_model_dirs(settings: Settings) -> None:
    """``ModelDirError`` naming the first of ``target_dir``, ``classifier_dir`` and
    ``drafter_dirs`` that is not a directory: the target's was said as a bare path after
    the imports, a drafter's only once the target had loaded."""
    configured = {"target_dir": settings.target_dir, "classifier_dir": settings.classifier_dir}
    configured |= {f"drafter_dirs.{name}": path for name, path in settings.drafter_dirs.items()}
    for name, path in configured.items():
        if path is None or path.is_dir():
            continue
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ModelDirError(f"{name}: {path} {what} (models load from local directories)")
    for root in settings.model_roots:  # a volume mounted later may make it one: said only
        if not root.expanduser().is_dir():
            logger.warning(
                "model_roots: %s is not a directory: no drafter under it can be registered "
                "while it is not",
                root,
            )


def check_ports_free(settings: Settings) -> None:
    """``ListenError`` when a configured port is taken by another process, given twice, or
    on an address this host does not have: checked before the models load, so that a
    sidecar already running on 50051 is said in one line, at once."""
    ports = {
        "gRPC (port)": settings.port,
        "HTTP (http_port)": settings.http_port,
        "metrics (metrics_port)": settings.metrics_port,
    }
    fixed = {name: port for name, port in ports.items() if port}  # None: off; 0: any free
    seen: dict[int, str] = {}
    for name, port in fixed.items():
        if port in seen:
            raise ListenError(f"{name} and {seen[port]} are both {port}: give each its own")
        seen[port] = name
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                settings.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as error:
            raise ListenError(cannot_listen(settings.host, port, name, error)) from None


LISTEN_HINTS = {
    errno.EADDRINUSE: "another process, such as a sidecar already running, holds it; stop it "
    "or choose another port",
    errno.EADDRNOTAVAIL: "this host has no such address: check host",
    errno.EACCES: "ports below 1024 need privileges: choose another port",
}


def cannot_listen(host: str, port: int, name: str, error: BaseException) -> str:
    """The one line saying why ``host:port`` cannot be listened on for ``name``."""
    number = error.errno if isinstance(error, OSError) else None
    reason = (error.strerror if isinstance(error, OSError) else None) or str(error)
    hint = LISTEN_HINTS.get(number or 0, "in use, or not an address of this host")
    return f"cannot listen on {host_port(host, port)} for {name}: {reason} ({hint})"
