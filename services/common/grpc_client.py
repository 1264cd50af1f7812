"""The client side of our gRPC: channels that carry TLS and the internal token
(`open_channel`), and a failed RPC back into the domain error it was (`domain_error`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from services.common import errors
from services.common.grpc_interceptors import ERROR_CLASS_KEY, INTERNAL_TOKEN_KEY, RETRY_AFTER_KEY
from services.common.settings import CommonSettings
from services.common.tracing import grpc_metadata

ChannelOptions = Sequence[tuple[str, Any]]


def open_channel(address: str, settings: CommonSettings | None, options: ChannelOptions = ()) -> grpc.aio.Channel:
    """A channel to another Roundhouse service at `address`, as `settings` say: over TLS
    (trusting `tls_ca`, else the system's roots) when `tls_ca` or `tls_cert` is set, and
    sending the internal token (the setting, else the one `roundhouse up` recorded) on every
    call. Every call carries the caller's trace context and request id (see
    `services.common.tracing`). Every gRPC channel a service or the CLI opens comes from here.

    `settings=None`: plaintext, no token (tests of a bare server).
    """
    token = settings.resolved_internal_token() if settings is not None else None
    interceptors = metadata_senders(token)
    if settings is None or not settings.client_tls():
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    roots = settings.tls_ca.read_bytes() if settings.tls_ca is not None else None
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=roots),
                                   options=options, interceptors=interceptors)


def metadata_senders(token: str | None) -> list[Any]:  # grpc-stubs has no usable interceptor type
    """Client interceptors that add the internal token (when given), the trace context and the
    request id to every call, one per call shape (a channel files each interceptor under the
    first shape it implements only).

    Interceptors rather than call credentials: those need a TLS channel, and internal traffic
    may be plaintext.
    """
    pairs = ((INTERNAL_TOKEN_KEY, token),) if token else ()
    return [_SendsMetadataUnaryUnary(pairs), _SendsMetadataUnaryStream(pairs),
            _SendsMetadataStreamUnary(pairs), _SendsMetadataStreamStream(pairs)]


class _SendsMetadata:
    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self._pairs = pairs

    def _with_metadata(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._pairs, *grpc_metadata())
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]  # a namedtuple


class _SendsMetadataUnaryUnary(_SendsMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)


class _SendsMetadataUnaryStream(_SendsMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_metadata(details), request)


class _SendsMetadataStreamUnary(_SendsMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_metadata(details), requests)


class _SendsMetadataStreamStream(_SendsMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_metadata(details), requests)


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
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
}

_RETRY_AFTER = (errors.Overloaded, errors.ModelNotReady, errors.ShuttingDown, errors.RateLimited,
                errors.LimitsUnavailable, errors.DatabaseUnavailable)
"""Errors that carry when to retry (`retry_after_s`)."""


def domain_error(exc: grpc.aio.AioRpcError, *, unavailable: str = "") -> errors.RoundhouseError:
    """The domain error a failed call stands for.

    Uses the class name our servers put in trailing metadata; falls back to the status code.
    `unavailable` replaces the message of transport failures (the peer is gone), which would
    otherwise leak addresses and library wording to clients. A call that ran past its deadline
    is `DeadlineExceeded`, never "not ready": retrying it at once would wait as long again.
    """
    # aio metadata iterates as (key, value) pairs; grpc-stubs types it as sync metadata.
    pairs = exc.trailing_metadata() or ()
    metadata: dict[str, object] = {str(k): v for k, v in pairs}  # type: ignore[misc,has-type]
    cls = _BY_NAME.get(str(metadata.get(ERROR_CLASS_KEY, "")))
    if cls is None:
        cls = _BY_CODE.get(exc.code(), errors.RoundhouseError)
        if exc.code() == grpc.StatusCode.UNAVAILABLE and unavailable:
            return errors.ModelNotReady(unavailable, retry_after_s=2.0)
    message = exc.details() or exc.code().name
    if cls in _RETRY_AFTER:
        retry_after = float(str(metadata.get(RETRY_AFTER_KEY, "1")))
        return cls(message, retry_after_s=retry_after)  # type: ignore[call-arg]
    return cls(message)
