"""Serving `POST /v1/embeddings`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import Response

from services.common.errors import FieldProblem, InvalidArgument
from services.router.http.auth import request_key
from services.router.http.embedding.protocol import EmbeddingRequest, response_body
from services.router.http.protocol import ModelCard
from services.router.http.streaming import client_timeout, record, routed_for, until_disconnected

if TYPE_CHECKING:
    from services.router.gateway import Gateway

ENDPOINT = "embeddings"


class EmbeddingServing:
    """Embeds through the gateway and answers in OpenAI's shape."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def create(self, body: EmbeddingRequest, request: Request) -> Response:
        """The vectors of every input, in input order, within the client's `x-request-timeout`
        when it sets one.

        `dimensions` is accepted only when it equals the model's vector length: checked
        against the registry before embedding when the length is known, else after.
        """
        timeout = client_timeout(request)
        if body.dimensions is not None:
            card = ModelCard.from_record(await self.gateway.get_model(body.model, key=request_key(request)))
            if card.embedding_dim is not None:
                self._check_dimensions(body.dimensions, card.id, card.embedding_dim)
        request_id: str = request.state.request_id
        record(request_id, ENDPOINT, body.recorded())
        routed = routed_for(request)
        result = await until_disconnected(request, self.gateway.embed(
            body.to_proto(request_id), timeout=timeout, key=request_key(request), routed=routed))
        if body.dimensions is not None:
            self._check_dimensions(body.dimensions, result.asset_id or body.model,
                                   result.dimensions or len(result.embeddings[0].values))
        return Response(response_body(result, result.asset_id or body.model, body.encoding_format),
                        media_type="application/json", headers=routed.headers())

    @staticmethod
    def _check_dimensions(wanted: int, model: str, actual: int) -> None:
        if wanted != actual:
            raise InvalidArgument.from_problems([FieldProblem(
                "dimensions",
                f"model {model!r} produces {actual}-dimensional vectors and cannot "
                f"shorten them; leave dimensions out or set it to {actual}",
            )])
