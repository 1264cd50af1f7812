"""Serving the Messages API through the gateway, like every other generation: the request's
key, its limits, routes, the usage ledger, metrics and admission apply unchanged."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from services.router.http.anthropic.protocol import CountTokensRequest, MessagesRequest, TokenCount
from services.router.http.anthropic.streaming import (
    MessageBuilder,
    MessageEvents,
    collect_message,
    message_events,
)
from services.router.http.auth import request_key
from services.router.http.streaming import (
    EventStreamResponse,
    client_timeout,
    first_chunk,
    record,
    routed_for,
    until_disconnected,
)

if TYPE_CHECKING:
    from services.router.gateway import Gateway

ENDPOINT = "messages"


def message_id() -> str:
    """A message id in Anthropic's style: `msg_` and 24 random hex digits."""
    return f"msg_{os.urandom(12).hex()}"


class MessagesServing:
    """Answers `POST /v1/messages` (whole or streamed) and `/v1/messages/count_tokens`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def create(self, body: MessagesRequest, request: Request) -> Response:
        """One message, within the client's `x-request-timeout` when it sets one. Failures
        before the answer starts propagate (and are answered in Anthropic's shape)."""
        request_id: str = request.state.request_id
        record(request_id, ENDPOINT, body.recorded())
        routed = routed_for(request)
        chunks = self.gateway.chat(body.to_proto(request_id), timeout=client_timeout(request),
                                   key=request_key(request), stream=body.stream, routed=routed)
        if not body.stream:
            built = await collect_message(request, chunks, MessageBuilder())
            message = built.message(message_id(), body.model)
            return Response(message.model_dump_json(), media_type="application/json",
                            headers=routed.headers())
        first = await first_chunk(request, chunks)
        events = MessageEvents(message_id(), first.asset_id or body.model)
        return EventStreamResponse(message_events(first, chunks, events, request_id=request_id),
                                   headers=routed.headers())

    async def count_tokens(self, body: CountTokensRequest, request: Request) -> Response:
        """The prompt tokens the conversation, system prompt and tools come to on the model
        (which is woken to count, as for a message)."""
        counted = await until_disconnected(request, self.gateway.count_tokens(
            body.to_proto(request.state.request_id), timeout=client_timeout(request),
            key=request_key(request)))
        count = TokenCount(input_tokens=counted.input_tokens)
        return Response(count.model_dump_json(), media_type="application/json")
