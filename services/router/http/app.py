"""The router's HTTP app: the OpenAI-compatible API, health probes and metrics.

`create_app(gateway, jobs)` is the composition root of the HTTP side; it builds one FastAPI app
with its own metrics registry, so several apps can live in one process (tests do).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from services.common.drain import Drain
from services.router.http.admin import admin_router
from services.router.http.anthropic.errors import MESSAGES_PATH, anthropic_error_response, document_anthropic_errors
from services.router.http.anthropic.routes import messages_router
from services.router.http.anthropic.serving import MessagesServing
from services.router.http.auth import AuthMiddleware, document_security
from services.router.http.chat.serving import ChatServing
from services.router.http.completion.serving import CompletionServing
from services.router.http.embedding.serving import EmbeddingServing
from services.router.http.errors import install_error_handlers
from services.router.http.events_feed import events_router
from services.router.http.keys import keys_router
from services.router.http.metrics import HttpMetrics
from services.router.http.middleware import BodyLimitMiddleware, DrainMiddleware, RequestContextMiddleware
from services.router.http.ollama import ModelLifecycle, OllamaServing, ollama_router
from services.router.http.ollama.errors import error_response as ollama_error_response
from services.router.http.rendering import OrjsonResponse
from services.router.http.routes import openai_router
from services.router.http.shadow import shadow_router
from services.router.http.stats import stats_router
from services.router.http.usage import usage_router
from services.router.routes.shadow import ShadowTraffic
from services.router.ui import admin_ui, install_ui

if TYPE_CHECKING:
    from collections.abc import Callable

    from roundhouse.v1.jobs_pb2_grpc import JobsStub
    from services.common.events import EventBus
    from services.common.keys import KeyStore
    from services.router.gateway import Gateway
    from services.router.keys import KeyAuthenticator
    from services.router.stats import AdminStats

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
READY_TIMEOUT_S = 5.0
ERROR_DIALECTS = ((MESSAGES_PATH, anthropic_error_response), ("/api/", ollama_error_response))
"""Path prefixes whose errors take another protocol's shape than OpenAI's."""


def create_app(
    gateway: Gateway, jobs: JobsStub, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    authenticator: KeyAuthenticator | None = None, key_store: KeyStore | None = None,
    on_key_revoked: Callable[[str], None] | None = None, metrics_auth: bool = False,
    tracing: bool = False, drain: Drain | None = None, metrics: HttpMetrics | None = None,
    shadow: ShadowTraffic | None = None, stats: AdminStats | None = None, bus: EventBus | None = None,
) -> FastAPI:
    """The HTTP API in front of `gateway`, with the admin API over `jobs` and `key_store`.

    Routes: `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions`, `/v1/completions`,
    `/v1/embeddings`, Anthropic's `/v1/messages` and `/v1/messages/count_tokens` (see
    `anthropic`), `/admin/v1/...` (see `admin`, `keys`, `usage` and `shadow`: a route's
    shadow summary at `/admin/v1/routes/{id}/shadow`), `/healthz`, `/readyz`,
    `/metrics`. Keys are checked by `authenticator` (see `auth`; None: not at all);
    `on_key_revoked(name)` runs after a revocation here. `stats` feeds `/admin/v1/stats/...`
    (None: one over `gateway` and `jobs`, without request figures); `bus` feeds the event feed
    `/admin/v1/events` (None: it answers 503). Bodies over `max_body_bytes`
    are refused with 413. Every error has OpenAI's shape (Anthropic's under `/v1/messages`);
    every response has `x-request-id`. The Ollama API is under `/api`, with
    `/` answering "Ollama is running" (see `ollama`; its errors take Ollama's shape).
    `tracing` turns on FastAPI's own OpenTelemetry spans, metrics and logs of each request;
    off, a request costs none of them (they are exported only when asked anyway, see
    `services.common.telemetry`).
    Once `drain` has begun (SIGTERM), `/readyz` answers 503 and every new request but the
    probes and `/metrics` is refused with 503 `shutting_down` and a Retry-After.
    """
    metrics = metrics or HttpMetrics()
    app = FastAPI(
        title="Roundhouse",
        summary="OpenAI-compatible API of the Roundhouse router.",
        version="1",
        telemetry={"tracing": tracing, "metrics": tracing, "logs": tracing,
                   "operation_spans": tracing},
    )
    app.state.gateway = gateway
    app.state.jobs = jobs
    app.state.metrics = metrics
    app.state.drain = drain = drain or Drain()
    app.state.key_store = key_store
    app.state.on_key_revoked = on_key_revoked
    app.state.stats = stats
    app.state.bus = bus
    app.state.chat = ChatServing(gateway)
    app.state.completion = CompletionServing(gateway)
    app.state.embedding = EmbeddingServing(gateway)
    app.state.messages = MessagesServing(gateway)
    install_error_handlers(app, ERROR_DIALECTS)
    app.state.ollama = OllamaServing(gateway, ModelLifecycle(gateway, jobs))
    app.include_router(openai_router)
    app.include_router(messages_router)
    app.include_router(admin_router)
    app.include_router(keys_router)
    app.include_router(usage_router)
    app.include_router(stats_router)
    app.include_router(events_router)
    app.include_router(ollama_router)
    # The gateway is asked only when a request needs it: apps are built before (or without) one.
    shadow = shadow or ShadowTraffic()
    app.include_router(shadow_router(shadow, lambda route_id: gateway.is_route(route_id)))
    install_ui(app, admin_ui(authenticator=authenticator, jobs=jobs, drain=drain, shadow=shadow.summary,
                             registry=lambda: gateway.catalog.registry))
    _add_operational_routes(app)
    # Added innermost first: request context, the drain, authentication, then the body limit,
    # so a request without a valid key is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_body_bytes)
    app.add_middleware(AuthMiddleware, authenticator=authenticator, metrics_auth=metrics_auth)
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RequestContextMiddleware, metrics=metrics,
                       error_dialects=ERROR_DIALECTS)
    app.openapi = lambda: _exact_openapi(app)  # type: ignore[method-assign]
    return app


# FastAPI documents a 422 with its own body on every route that takes input; this app answers
# invalid input with a 400 in OpenAI's shape, which each route that can refuse input declares.
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def _exact_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as the server behaves: no 422 anywhere (invalid input is a 400 with
    the `ErrorResponse` body, documented by the routes that can refuse input), and the API
    keys each `/v1` and `/admin/v1` route takes, with their 401 and 403."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                               summary=app.summary, description=app.description, routes=app.routes)
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                operation.get("responses", {}).pop("422", None)
        schemas = document.get("components", {}).get("schemas", {})
        for name in _FASTAPI_VALIDATION:
            schemas.pop(name, None)
        document_security(document, "#/components/schemas/ErrorResponse")
        document_anthropic_errors(document, "#/components/schemas/AnthropicErrorResponse")
        app.openapi_schema = document
    return app.openapi_schema


def _add_operational_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP. Touches nothing else."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={
        503: {"description": "Not ready: the router is draining (shutting down), the registry "
                             "does not answer or no worker is known."}})
    async def readyz(request: Request) -> Response:
        """Readiness: the router is not draining, the registry answers and a worker is known.
        Never wakes a model.

        Models the workers report as failed (a load that failed, an engine that died) are
        listed, and make the status `degraded`; the router still serves every other model,
        so it stays ready (200)."""
        if request.app.state.drain.draining:
            return OrjsonResponse({"status": "draining", "failed_models": []}, status_code=503)
        gateway: Gateway = request.app.state.gateway
        try:
            ready = await asyncio.wait_for(gateway.ready(), READY_TIMEOUT_S)
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            ready = False
        failed = [{"asset_id": f.asset_id, "worker_id": worker_id, "stage": f.stage, "reason": f.reason}
                  for worker_id, f in gateway.workers.failed_models()]
        status = ("degraded" if failed else "ready") if ready else "not ready"
        return OrjsonResponse({"status": status, "failed_models": failed},
                              status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of this app's metrics."""
        registry: HttpMetrics = request.app.state.metrics
        return Response(registry.render(), media_type=registry.content_type)
