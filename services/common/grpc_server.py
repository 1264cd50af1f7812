"""The gRPC server every service reuses: health, reflection, error mapping, the internal token,
TLS, message size limits, and the drain on SIGTERM (see `services.common.drain`)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors
from services.common.db.unavailable import as_domain_error
from services.common.drain import Drain
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ERROR_CLASS_KEY = "roundhouse-error"
RETRY_AFTER_KEY = "retry-after"
INTERNAL_TOKEN_KEY = "x-roundhouse-internal-token"
"""Metadata key that carries the internal token (see `CommonSettings.internal_token`)."""
QUEUE_TIMEOUT_KEY = "x-roundhouse-queue-timeout-s"
"""Metadata key of a router's call to a worker: seconds the request may still wait there for a
slot of its model (what is left of the asset's `queue_timeout_s`)."""
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Method prefixes callable without the internal token: probes and tooling."""

_CODES: list[tuple[type[errors.RoundhouseError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.BudgetExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.LimitsUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
    (errors.UpstreamError, grpc.StatusCode.UNAVAILABLE),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (errors.DatabaseUnavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code_for(exc: errors.RoundhouseError) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    exc = as_domain_error(exc)
    if isinstance(exc, errors.RoundhouseError):
        # The class name lets a caller one hop up re-raise the same domain error.
        metadata = [(ERROR_CLASS_KEY, type(exc).__name__)]
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            metadata.append((RETRY_AFTER_KEY, f"{retry_after:.3f}"))
        context.set_trailing_metadata(tuple(metadata))
        await context.abort(status_code_for(exc), exc.message)
    log.exception("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into gRPC statuses in one place; anything else becomes INTERNAL.

    With `drain`, once it has begun every new call (health and reflection aside) fails with
    `ShuttingDown` (UNAVAILABLE, with a retry hint); calls already running go on.
    """

    def __init__(self, drain: Drain | None = None) -> None:
        self._drain = drain

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        drain = None if method.startswith(OPEN_SERVICES) else self._drain
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if drain is not None:
                        drain.refuse_new_work()
                    return await inner_uu(request, context)  # type: ignore[arg-type]  # aio handler
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped or logged as INTERNAL
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if drain is not None:
                        drain.refuse_new_work()
                    async for item in inner_us(request, context):  # type: ignore[attr-defined,arg-type]
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call that does not carry the internal token, except
    health and reflection."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES) \
                or self._carries_token(handler_call_details):
            return handler
        return _refusing(handler)

    def _carries_token(self, details: grpc.HandlerCallDetails) -> bool:
        sent = next((v for k, v in details.invocation_metadata or () if k == INTERNAL_TOKEN_KEY), "")
        sent_bytes = sent.encode() if isinstance(sent, str) else bytes(sent)
        return hmac.compare_digest(sent_bytes, self._token)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")

    async def refuse_stream(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")
        yield  # unreachable: makes this an async generator, as a streaming handler must be

    wire = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, *wire)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, *wire)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, *wire)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, *wire)


def server_credentials(settings: CommonSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from `tls_cert` / `tls_key`, or None (plaintext) when they are unset."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("ROUNDHOUSE_TLS_CERT and ROUNDHOUSE_TLS_KEY must be set together")
    return grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to host: the generated `add_*_to_server`, its servicer, its full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


class GrpcServer:
    """An aio server with health (SERVING once started), reflection and error mapping.

    With `settings`, it serves TLS when `tls_cert` / `tls_key` are set and, when `internal` and
    `internal_token` is set, refuses calls without the token. Without, plaintext and open.
    Messages over `max_message_bytes` are refused (RESOURCE_EXHAUSTED). `drain` (by default the
    one `settings` describe) times the stop; with `refuse_while_draining`, every new call is
    refused with UNAVAILABLE once it has begun, otherwise the services refuse what they must.
    """

    def __init__(
        self, address: str, bindings: Sequence[ServiceBinding], settings: CommonSettings | None = None,
        *, internal: bool = True, max_message_bytes: int = MAX_MESSAGE_BYTES, drain: Drain | None = None,
        refuse_while_draining: bool = False,
    ) -> None:
        self._address = address
        self._bindings = list(bindings)
        self._credentials = server_credentials(settings) if settings is not None else None
        self.drain = drain or (Drain.from_settings(settings) if settings is not None else Drain())
        token = settings.internal_token if settings is not None and internal else None
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ErrorMappingInterceptor(self.drain if refuse_while_draining else None)]
        if token is not None and token.get_secret_value():
            interceptors.insert(0, InternalTokenInterceptor(token.get_secret_value()))
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # not in grpc-stubs
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max(max_message_bytes, MAX_MESSAGE_BYTES)),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        self.port = 0

    async def start(self) -> int:
        """Bind, start, mark every service SERVING; returns the bound port."""
        for binding in self._bindings:
            binding.add_to_server(binding.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [b.full_name for b in self._bindings]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self._server,
        )
        if self._credentials is not None:
            self.port = self._server.add_secure_port(self._address, self._credentials)
        else:
            self.port = self._server.add_insecure_port(self._address)
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC server to {self._address}")
        await self._server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def begin_drain(self) -> None:
        """Begin the drain: report NOT_SERVING and, when this server does, refuse new calls."""
        self.drain.begin()
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING; in-flight calls get `grace` s (None: the drain's rest), then are cut."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.drain.remaining_s() if grace is None else grace)


async def run_until_signal(
    server: GrpcServer,
    *,
    on_started: Callable[[int], None] | None = None,
    before_stop: Callable[[], Awaitable[None]] | None = None,
    also_stop: Sequence[Callable[[float], Awaitable[None]]] = (),
    cleanups: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Start `server`, wait for SIGTERM/SIGINT, drain, stop, then run `cleanups` in order.

    The drain (`server.drain`): health NOT_SERVING at once, new calls refused when the server
    refuses while draining, then `before_stop` runs while the server still serves (to tell
    others to stop sending work, to wait for the work in flight). The listener closes once it
    is done and the drain delay has passed; calls in flight get the rest of the drain timeout,
    as does each of `also_stop` (another listener), alongside.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    if on_started:
        on_started(port)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a second signal stops the process at once
        drain = server.drain
        log.info("draining: new work is refused; work in flight has %g s to finish (a second "
                 "signal stops at once)", drain.timeout_s)
        await server.begin_drain()
        await asyncio.gather(_logged(before_stop, "pre-stop step"), drain.hold_listener())
        grace = drain.remaining_s()
        await asyncio.gather(*(_logged(functools.partial(stop_one, grace), "stopping a listener")
                               for stop_one in (server.stop, *also_stop)))
        log.info("shutting down")
        for cleanup in cleanups:
            await _logged(cleanup, "cleanup")


async def _logged(step: Callable[[], Awaitable[None]] | None, what: str) -> None:
    """Run `step`; a failure is logged and the shutdown goes on."""
    if step is not None:
        try:
            await step()
        except Exception:  # noqa: BLE001 - shut down regardless
            log.exception("%s failed", what)
