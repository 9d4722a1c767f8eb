"""Typed domain errors of the sidecar, and the one table mapping them to status codes.

Domain code raises these; the gRPC interceptor and the HTTP front translate them at the
edge (gRPC status code, HTTP status + TGI ``error_type``). Nothing else knows about codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from pydantic import ValidationError

logger = logging.getLogger(__name__)


class ListenError(RuntimeError):
    """A port the sidecar is configured to serve on cannot be listened on (held by another
    process, or an address this host does not have): the start stops, in one line."""


class SidecarError(Exception):
    """Base of every error the sidecar reports to a caller."""


class InvalidRequestError(SidecarError):
    """The request itself is malformed or outside the limits."""


class InvalidFieldError(InvalidRequestError):
    """One named field of the request holds a value the API refuses (NaN, out of range,
    inconsistent with another field); the message starts with the field's name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class RequestTooLargeError(InvalidRequestError):
    """An HTTP body over ``limits.max_request_bytes`` (gRPC refuses such a message itself,
    RESOURCE_EXHAUSTED)."""


class ContextLengthError(InvalidRequestError):
    """A prompt, or an answer's budget, over the sidecar's limits (``max_prompt_tokens``,
    ``max_new_tokens``): OpenAI's ``context_length_exceeded``, which clients test for to
    trim or fall back."""


class ContextLengthFieldError(ContextLengthError):
    """A ContextLengthError that one named field of the request caused (an answer's
    budget over ``max_new_tokens``): OpenAI's ``context_length_exceeded`` with a param."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFoundError(SidecarError):
    """A named drafter or request id does not exist."""


class AlreadyExistsError(SidecarError):
    """A drafter name is taken, or a request was already reported."""


class PreconditionError(SidecarError):
    """The request is well-formed but the system state refuses it (e.g. tokenizer mismatch)."""


class PermissionDeniedError(SidecarError):
    """The caller may not do this (e.g. a model path outside the configured roots)."""


class OverloadedError(SidecarError):
    """The bounded generation queue is full."""


class StorageFullError(SidecarError):
    """The state store's disk is full: what the call would have saved was not saved, and
    nothing it would have changed was changed."""


class CapacityError(SidecarError):
    """The sidecar has no room for what the call would add (a drafter past
    ``limits.max_registered_drafters``, or weights that do not fit in the memory left):
    nothing was changed."""


class StorageFailedError(PreconditionError):
    """The state store cannot be written (a disk remounted read-only after I/O errors,
    permissions changed under it): what the call would have saved was not saved, and an
    operator has to act before a retry can work."""


class UnauthenticatedError(SidecarError):
    """No valid bearer token for a call that needs one."""


class GenerationFailedError(SidecarError):
    """The engine failed while generating."""


class UnavailableError(SidecarError):
    """Nothing can serve the request now, for a while (fleet mode: no replica serving):
    UNAVAILABLE, which clients' retry policies retry, where INTERNAL is not."""


class CutByStopError(UnavailableError):
    """A generation still running when the sidecar's stop had waited its grace for it:
    ended, UNAVAILABLE, so that a client may retry it on another replica."""

    def __init__(self, grace_s: float) -> None:
        super().__init__(
            f"the sidecar is stopping and this generation had not finished within its grace "
            f"of {grace_s:g} s; retry it"
        )


class StorageLockedError(UnavailableError):
    """Another process holds the state store's write lock (an operator's ``sqlite3``
    shell, a backup) past SQLite's wait: nothing was saved or changed; retry once it is
    free."""


class RequestFailsReplicasError(GenerationFailedError):
    """A request that failed on fleet replicas it reached (``max_replica_failures`` of
    them, or every replica left serving): it may be what makes them fail, so it is not
    sent on, and a client should not send it again as is (the OpenAI front says
    ``x-should-retry: false``, which the official clients obey)."""


class InternalError(SidecarError):
    """A bug: an exception that no error type above covers (:func:`sidecar_error_of`)."""


def sidecar_error_of(error: Exception, where: str) -> SidecarError:
    """What the caller is told of ``error``: a :class:`SidecarError` as it is; anything
    else (a bug) logged with its traceback and turned into INTERNAL (HTTP 500) naming
    ``where`` (a method or a route) and its type only."""
    if isinstance(error, SidecarError):
        return error
    logger.error("%s failed unexpectedly", where, exc_info=error)
    return InternalError(
        f"{where} failed: {type(error).__name__} (the sidecar's log has the traceback)"
    )


@dataclass(frozen=True)
class ErrorStatus:
    """How one error type appears on each wire."""

    grpc_code: grpc.StatusCode
    http_status: int
    tgi_error_type: str


ERROR_STATUSES: dict[type[SidecarError], ErrorStatus] = {
    InvalidRequestError: ErrorStatus(grpc.StatusCode.INVALID_ARGUMENT, 422, "validation"),
    RequestTooLargeError: ErrorStatus(grpc.StatusCode.INVALID_ARGUMENT, 413, "validation"),
    NotFoundError: ErrorStatus(grpc.StatusCode.NOT_FOUND, 404, "not_found"),
    AlreadyExistsError: ErrorStatus(grpc.StatusCode.ALREADY_EXISTS, 409, "already_exists"),
    PreconditionError: ErrorStatus(grpc.StatusCode.FAILED_PRECONDITION, 422, "validation"),
    PermissionDeniedError: ErrorStatus(grpc.StatusCode.PERMISSION_DENIED, 403, "forbidden"),
    OverloadedError: ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "overloaded"),
    StorageFullError: ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 507, "storage_full"),
    CapacityError: ErrorStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 507, "capacity"),
    UnauthenticatedError: ErrorStatus(grpc.StatusCode.UNAUTHENTICATED, 401, "unauthenticated"),
    GenerationFailedError: ErrorStatus(grpc.StatusCode.INTERNAL, 424, "generation"),
    UnavailableError: ErrorStatus(grpc.StatusCode.UNAVAILABLE, 503, "unavailable"),
}

UNEXPECTED = ErrorStatus(grpc.StatusCode.INTERNAL, 500, "incomplete_generation")


def status_of(error: BaseException) -> ErrorStatus:
    """The wire status for ``error``: its nearest mapped class, else INTERNAL."""
    for cls in type(error).__mro__:
        status = ERROR_STATUSES.get(cls)  # type: ignore[arg-type]
        if status is not None:
            return status
    return UNEXPECTED


def validation_lines(error: ValidationError) -> str:
    """Each problem as ``where: what (got value)``, without pydantic's type codes and
    documentation links; several start on lines of their own."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        message = str(problem["msg"]).removeprefix("Value error, ")
        given = problem.get("input")
        # Our own validators name the value; a missing field or a whole table has none.
        quiet = problem["type"] in ("value_error", "missing") or isinstance(given, dict)
        shown = "" if quiet else f" (got {given!r})"
        lines.append(f"{where}: {message}{shown}" if where else f"{message}{shown}")
    return lines[0] if len(lines) == 1 else "".join(f"\n  {line}" for line in lines)
