"""What the response cache may keep, and under which key.

A cached answer is found again only by an exact match on the asset that answered (id and
revision: a new revision never answers from the old one's entries), the caller's scope (its
key, or everyone for a `scope: shared` route) and the canonical request: the request proto
without the fields that do not change the answer (`model`, `request_id`, `user`), serialized
deterministically.

Chat is cached only when generation is greedy, unless the route opts in with
`nondeterministic: true`. Embeddings are always deterministic: they need no check.
"""

from __future__ import annotations

import hashlib

from google.protobuf.message import Message

from roundhouse.v1 import inference_pb2
from services.common.assetspec import Generation
from services.common.routespec import Cache

SHARED_SCOPE = "*"
"""The `scope_key` of a `scope: shared` route: every caller sees the same entries."""

IGNORED_FIELDS = ("model", "request_id", "user")
"""Request fields that do not change the answer: the name the caller used (route, alias or
asset id), its correlation id and its end user."""

_KEY_PREFIX = "r1."
"""Names the key layout; a new layout gets a new prefix, so old entries are never misread."""


def chat_cacheable(request: inference_pb2.ChatRequest, generation: Generation, cache: Cache) -> bool:
    """Whether an answer to `request` may be cached and served again under `cache`: one of a
    single choice (the cache keeps one chunk per answer), then any with
    `cache.nondeterministic`, else only a greedy one (see `greedy`). Every other field of the
    request (penalties, biases, log probabilities, the answer's format, tools) is part of the
    key (see `canonical_body`)."""
    return request.n <= 1 and (cache.nondeterministic or greedy(request, generation))


def greedy(request: inference_pb2.ChatRequest, generation: Generation) -> bool:
    """Whether `request` is decoded greedily: the temperature or the top-p that generation
    uses is 0. Each is the request's own when it sets it, else the asset's declared default
    (`generation`), as the worker picks them. With neither set, the worker falls back to the
    model folder's defaults, which never decode greedily (a folder that samples gives its
    temperature and top-p, otherwise sampling at temperature 1 and top-p 1 is used). A seed
    does not make a request greedy: sampled logits may still differ between batches on some
    devices.
    """
    temperature = request.temperature if request.HasField("temperature") else generation.temperature
    top_p = request.top_p if request.HasField("top_p") else generation.top_p
    return temperature == 0 or top_p == 0


def canonical_body(request: Message) -> bytes:
    """`request` as the cache compares it: without `IGNORED_FIELDS` and unknown fields,
    serialized deterministically (map entries ordered, fields in number order)."""
    canonical = type(request)()
    canonical.CopyFrom(request)
    names = canonical.DESCRIPTOR.fields_by_name
    for name in IGNORED_FIELDS:
        if name in names:
            canonical.ClearField(name)
    canonical.DiscardUnknownFields()
    return canonical.SerializeToString(deterministic=True)


def cache_key(asset_id: str, revision: int, scope_key: str, request: Message) -> str:
    """The response cache's key for `request` answered by revision `revision` of `asset_id`,
    seen by `scope_key` (the caller's key id, '' when auth is off, `SHARED_SCOPE` for a shared
    route).

    A valid NATS key-value key (`r1.` and 64 hex digits). Requests that differ only in
    `IGNORED_FIELDS` share it; any other difference, the request's type included (a chat and an
    embedding request may serialize alike), gives another.
    """
    digest = hashlib.blake2b(digest_size=32)
    for part in (asset_id.encode(), str(revision).encode(), scope_key.encode(),
                 request.DESCRIPTOR.full_name.encode(), canonical_body(request)):
        # Each part length-prefixed: no two tuples of parts hash the same bytes.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return _KEY_PREFIX + digest.hexdigest()
