"""Client side of the error mapping: a failed RPC back into the domain error it was."""

from __future__ import annotations

import grpc

from services.common import errors
from services.common.grpc_server import ERROR_CLASS_KEY, RETRY_AFTER_KEY

_BY_NAME: dict[str, type[errors.RoundhouseError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.RoundhouseError)
}

_BY_CODE: dict[grpc.StatusCode, type[errors.RoundhouseError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ABORTED: errors.Conflict,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Overloaded,
    grpc.StatusCode.UNAVAILABLE: errors.ModelNotReady,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.ModelNotReady,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}


def domain_error(exc: grpc.aio.AioRpcError, *, unavailable: str = "") -> errors.RoundhouseError:
    """The domain error a failed call stands for.

    Uses the class name our servers put in trailing metadata; falls back to the status code.
    `unavailable` replaces the message of transport failures (the peer is gone), which would
    otherwise leak addresses and library wording to clients.
    """
    # aio metadata iterates as (key, value) pairs; grpc-stubs types it as sync metadata.
    pairs = exc.trailing_metadata() or ()
    metadata: dict[str, object] = {str(k): v for k, v in pairs}  # type: ignore[misc,has-type]
    cls = _BY_NAME.get(str(metadata.get(ERROR_CLASS_KEY, "")))
    if cls is None:
        cls = _BY_CODE.get(exc.code(), errors.RoundhouseError)
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                and unavailable:
            return errors.ModelNotReady(unavailable, retry_after_s=2.0)
    message = exc.details() or exc.code().name
    if cls in (errors.Overloaded, errors.ModelNotReady):
        retry_after = float(str(metadata.get(RETRY_AFTER_KEY, "1")))
        return cls(message, retry_after_s=retry_after)  # type: ignore[call-arg]
    return cls(message)
