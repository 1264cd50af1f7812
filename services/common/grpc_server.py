"""The gRPC server every service reuses: health, reflection, error mapping, the internal token,
TLS, message size limits, and the drain on SIGTERM (see `services.common.drain`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.drain import Drain
from services.common.grpc_interceptors import ErrorMappingInterceptor, InternalTokenInterceptor
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
