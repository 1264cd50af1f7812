"""`POST /v1/embeddings` end to end: the vectors the official `openai` client gets, in both
encodings, are the ones the same model folder gives in-process; and the body the route
writes is exactly what its response models describe.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import openai
import pytest
from sentence_transformers import SentenceTransformer
from stack_harness import TINY_EMBED

from roundhouse.v1 import inference_pb2
from services.router.http.embedding.protocol import (
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
    encode_vector,
    response_body,
)
from services.worker.converters import embed_response
from services.worker.models import EmbedResult

SENTENCES = [f"w{i} w{i + 1} hello w{i % 5}" for i in range(40)]


@pytest.fixture(scope="module")
def in_process(sources: Path) -> np.ndarray:
    """The sentences' vectors from the model folder, without the stack."""
    model = SentenceTransformer(str(sources / TINY_EMBED), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True)


def as_float32(reply: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.array([d.embedding for d in reply.data], dtype=np.float32)


async def test_both_encodings_carry_the_in_process_vectors(
    client: openai.AsyncOpenAI, in_process: np.ndarray
) -> None:
    floats = await client.embeddings.create(model=TINY_EMBED, input=SENTENCES, encoding_format="float")
    # Without `encoding_format` the client asks for base64 and decodes the bytes itself.
    packed = await client.embeddings.create(model=TINY_EMBED, input=SENTENCES)
    assert [d.index for d in floats.data] == list(range(len(SENTENCES)))
    # Each encoding carries the worker's float32 values exactly, so they agree to the bit.
    assert as_float32(floats).tobytes() == as_float32(packed).tobytes()
    np.testing.assert_allclose(as_float32(floats), in_process, rtol=0, atol=1e-6)


async def test_concurrent_one_sentence_requests_each_get_their_own_vector(
    client: openai.AsyncOpenAI, in_process: np.ndarray
) -> None:
    replies = await asyncio.gather(*(
        client.embeddings.create(model=TINY_EMBED, input=text,
                                 encoding_format="float" if i % 2 else openai.omit)
        for i, text in enumerate(SENTENCES)
    ))
    served = np.concatenate([as_float32(reply) for reply in replies])
    np.testing.assert_allclose(served, in_process, rtol=0, atol=1e-6)
    assert all(reply.usage.prompt_tokens > 0 for reply in replies)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_the_body_is_what_the_response_models_write(encoding: str) -> None:
    rows = np.random.default_rng(3).standard_normal((3, 24)).astype(np.float32)
    rows[1, :3] = [1e-40, -0.0, 3.4e38]
    sent = embed_response(EmbedResult(vectors=rows, prompt_tokens=9, dimensions=24), "m")
    reply = inference_pb2.EmbedResponse.FromString(sent.SerializeToString())
    body = response_body(reply, "served-model", encoding)
    modelled = EmbeddingResponse(
        data=[EmbeddingData(index=i, embedding=encode_vector(e.values, encoding))
              for i, e in enumerate(reply.embeddings)],
        model="served-model",
        usage=EmbeddingUsage(prompt_tokens=9, total_tokens=9),
    )
    assert body == modelled.model_dump_json().encode()
    assert EmbeddingResponse.model_validate_json(body) == modelled
