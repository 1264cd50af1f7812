"""Schemathesis over every `/v1` and `/admin/v1` operation of a real stack, and the admin API's
exact inputs.

The stack (registry, worker, jobs, router) runs in-process with the tiny random-weight models,
on an event loop of its own thread: schemathesis' tests are synchronous and call the router
over HTTP. Schemathesis reads the app's OpenAPI document, built at import so that pytest lists
one test per operation (a test checks it is the document the router serves), narrowed in three
ways only: the destructive admin routes (install, load, unload, delete, cancel, key revoke)
may only name throwaway assets, their operations and throwaway keys, so a fuzzed delete never
removes a model the other operations use nor a revoke the admin key every call sends; an
inference request names a real model or an unknown one, so requests reach
the worker; and every generation is bounded to a few tokens (the test lowers `max_tokens` and
`n` before sending). Checks: no server error, no request the schema allows refused as invalid,
every status, header, content type and body documented, and 405 for an undeclared method.
Examples are bounded per operation and derandomized, so CI sends the same cases each time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, build_sources, running_stack, tiny_documents

from services.router.http.app import create_app

LIFECYCLE_ASSETS = ("fuzz-a", "fuzz-b")
"""What the fuzzed install, load and unload may act on."""
DOOMED_ASSETS = ("fuzz-gone-a", "fuzz-gone-b")
"""What the fuzzed delete may act on."""
PAGED_ASSET = "fuzz-pages"
"""Operations of its own for the paging test; the fuzzer never names it."""
THROWAWAY = (*LIFECYCLE_ASSETS, *DOOMED_ASSETS, PAGED_ASSET)
QUEUED_OPERATIONS = ("queued-install", "queued-unload")
"""Stand-ins in the fuzzed document for operations queued on throwaway assets at run time."""
UNKNOWN_OPERATION = "00000000-0000-4000-8000-000000000000"
UNKNOWN_MODEL = "no-such-model"
THROWAWAY_KEYS = ("fuzz-key-a", "fuzz-key-b")
"""What the fuzzed revoke may act on (made before fuzzing; the admin key is never named)."""
TINY_EMBED_DIMENSIONS, TINY_VOCABULARY = 32, 211
"""The tiny embedding model's vector size and vocabulary (tests/tiny_models.py)."""
MAX_TOKENS, MAX_CHOICES = 4, 2
EXAMPLES_PER_OPERATION = 50
CHECKS = ("not_a_server_error", "positive_data_acceptance", "status_code_conformance",
          "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "unsupported_method")
FUZZED_PATHS = r"^/(v1|admin/v1)/"


class LoopThread:
    """An event loop running in a thread of its own; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-stack", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 120.0) -> Any:
        """The coroutine's result, run on this loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


def throwaway_document(sources: Path, asset_id: str) -> dict[str, Any]:
    """A tiny chat asset of its own folder (a copy of the tiny chat model)."""
    if not (sources / asset_id).exists():
        shutil.copytree(sources / TINY_CHAT, sources / asset_id)
    return {"asset_id": asset_id, "interface": "llm-runtime",
            "source": {"kind": "path", "path": str(sources / asset_id)}}


@pytest.fixture(scope="module")
def stack(db_dsn: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The tiny models and the throwaway assets, served by a stack on a thread of its own."""
    sources = build_sources(tmp_path_factory.mktemp("fuzz-sources"))
    documents = [*tiny_documents(sources), *(throwaway_document(sources, a) for a in THROWAWAY)]
    thread = LoopThread()
    try:
        context = running_stack(db_dsn, nats_url, sources, tmp_path_factory.mktemp("fuzz-store"), auth=True)
        running = thread.run(context.__aenter__())
        try:
            thread.run(running.apply(*documents))
            yield running
        finally:
            thread.run(context.__aexit__(None, None, None))
    finally:
        thread.close()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    """A client of the admin API, with the admin key."""
    with httpx.Client(base_url=f"{stack.http_url}/admin/v1", timeout=60, headers=stack.admin_headers) as client:
        yield client


@pytest.fixture(scope="module")
def published(stack: Stack) -> dict[str, Any]:
    """The OpenAPI document the router serves."""
    reply = httpx.get(f"{stack.http_url}/openapi.json", timeout=30, headers=stack.admin_headers)
    reply.raise_for_status()
    document: dict[str, Any] = reply.json()
    return document


@pytest.fixture(scope="module")
def queued_operations(admin: httpx.Client) -> dict[str, str]:
    """Real operations on throwaway assets, by the stand-in the fuzzed document names them with."""
    kinds = ("install", "unload")
    return {stand_in: queue(admin, asset_id, kind)
            for stand_in, asset_id, kind in zip(QUEUED_OPERATIONS, LIFECYCLE_ASSETS, kinds, strict=True)}


@pytest.fixture(scope="module")
def throwaway_keys(admin: httpx.Client) -> None:
    """The keys the fuzzed revoke names, made first so that revoking them can succeed."""
    for name in THROWAWAY_KEYS:
        reply = admin.post("/keys", json={"name": name})
        assert reply.status_code in (201, 409), reply.text


def queue(admin: httpx.Client, asset_id: str, kind: str) -> str:
    """Submit an operation through the admin API; its id."""
    reply = admin.post(f"/models/{asset_id}/{kind}")
    assert reply.status_code == 202, reply.text
    operation_id: str = reply.json()["operation_id"]
    return operation_id


def _set_parameter(document: dict[str, Any], path: str, method: str, name: str, schema: dict) -> None:
    [parameter] = [p for p in document["paths"][path][method]["parameters"] if p["name"] == name]
    parameter["schema"] = schema


def _body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    reference = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema: dict[str, Any] = document["components"]["schemas"][reference.rsplit("/", 1)[1]]
    return schema


def fuzzing_view(published: dict[str, Any]) -> dict[str, Any]:
    """The published document, with destructive routes held to throwaway assets and their
    operations, and inference requests naming a real model or an unknown one."""
    document = copy.deepcopy(published)
    _set_parameter(document, "/admin/v1/models/{asset_id}/{kind}", "post", "asset_id",
                   {"type": "string", "enum": list(LIFECYCLE_ASSETS)})
    _set_parameter(document, "/admin/v1/models/{asset_id}", "delete", "asset_id",
                   {"type": "string", "enum": list(DOOMED_ASSETS)})
    _set_parameter(document, "/admin/v1/keys/{name}", "delete", "name",
                   {"type": "string", "enum": [*THROWAWAY_KEYS, "no-such-key"]})
    for path, method in (("/admin/v1/operations/{operation_id}", "get"),
                         ("/admin/v1/operations/{operation_id}/cancel", "post")):
        _set_parameter(document, path, method, "operation_id",
                       {"type": "string", "enum": [*QUEUED_OPERATIONS, UNKNOWN_OPERATION]})
    for path, models in (("/v1/chat/completions", [TINY_CHAT, "tiny-alias"]),
                         ("/v1/completions", [TINY_CHAT]), ("/v1/embeddings", [TINY_EMBED])):
        properties = _body_schema(document, path)["properties"]
        properties["model"] = {"type": "string", "enum": [*models, UNKNOWN_MODEL]}
    # Like `model`, these are only valid per model, so they are pinned to the tiny model's:
    # `dimensions` (its vector size) and token ids (its vocabulary).
    embedding = _body_schema(document, "/v1/embeddings")["properties"]
    embedding["dimensions"] = {"anyOf": [{"type": "integer", "enum": [TINY_EMBED_DIMENSIONS]}, {"type": "null"}]}
    _bound_token_ids(embedding["input"], TINY_VOCABULARY - 1)
    return document


def _bound_token_ids(schema: Any, highest: int) -> None:
    """Every integer item below `schema` (token ids) at most `highest`."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = highest
        for value in schema.values():
            _bound_token_ids(value, highest)
    elif isinstance(schema, list):
        for value in schema:
            _bound_token_ids(value, highest)


# Built as the router builds it (the app needs no running service to describe itself).
DOCUMENT: dict[str, Any] = json.loads(json.dumps(create_app(None, None).openapi()))  # type: ignore[arg-type]
CONFIG = schemathesis.Config.from_dict({
    "request-timeout": 60,
    "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "output": {"sanitization": {"enabled": False}},
})
schema = schemathesis.openapi.from_dict(fuzzing_view(DOCUMENT), config=CONFIG).include(path_regex=FUZZED_PATHS)


def bound_generation(case: Case) -> None:
    """At most `MAX_TOKENS` tokens and `MAX_CHOICES` choices per generation, so each stays short."""
    if case.path not in ("/v1/chat/completions", "/v1/completions") or not isinstance(case.body, dict):
        return
    body = case.body
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    for field, bound in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS),
                         ("n", MAX_CHOICES), ("best_of", MAX_CHOICES)):
        value = body.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
            body[field] = bound


def aim_at_throwaways(case: Case, queued_operations: dict[str, str]) -> None:
    """Stand-ins become the real operations; a case built outside the document's enums
    (coverage's negative ones) still names no real model."""
    parameters = case.path_parameters if isinstance(case.path_parameters, dict) else {}
    if parameters.get("operation_id") in queued_operations:
        parameters["operation_id"] = queued_operations[parameters["operation_id"]]
    if case.path.startswith("/admin/v1/models/") and parameters.get("asset_id") in (TINY_CHAT, TINY_EMBED):
        parameters["asset_id"] = DOOMED_ASSETS[0]
    if case.path == "/admin/v1/keys/{name}" and parameters.get("name") not in THROWAWAY_KEYS:
        parameters["name"] = "no-such-key"


def test_the_router_serves_the_document_fuzzed_here(published: dict[str, Any]) -> None:
    assert published == DOCUMENT


def test_the_document_says_400_where_fastapi_says_422(published: dict[str, Any]) -> None:
    operations = [(f"{m.upper()} {p}", o) for p, item in published["paths"].items() for m, o in item.items()]
    assert not [label for label, o in operations if "422" in o["responses"]]
    assert "HTTPValidationError" not in published["components"]["schemas"]
    refusing = [(label, o) for label, o in operations if o.get("requestBody") or any(
        set(p["schema"]) & {"pattern", "enum", "minimum", "maximum"} for p in o.get("parameters", []))]
    assert refusing
    for label, operation in refusing:
        invalid = operation["responses"].get("400", {})
        schema_ref = invalid.get("content", {}).get("application/json", {}).get("schema")
        assert schema_ref == {"$ref": "#/components/schemas/ErrorResponse"}, label


@pytest.mark.parametrize("method, url, param", [
    ("POST", "/models/a%00b/load", "asset_id"),
    ("POST", "/models/Not-An-Id/install", "asset_id"),
    ("DELETE", "/models/a%00b", "asset_id"),
    ("GET", "/operations?asset_id=%00", "asset_id"),
    ("GET", "/operations?page_token=bogus", "page_token"),
    ("GET", "/operations?page_size=0", "page_size"),
])
def test_impossible_inputs_are_400s_naming_the_field(
    admin: httpx.Client, method: str, url: str, param: str
) -> None:
    reply = admin.request(method, url)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("field", ["idempotency_key", "worker_id"])
def test_a_nul_byte_in_an_option_is_a_400_naming_it(admin: httpx.Client, field: str) -> None:
    reply = admin.post(f"/models/{LIFECYCLE_ASSETS[0]}/unload", json={field: "a\x00b"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field


def test_an_unknown_but_possible_asset_id_is_a_404(admin: httpx.Client) -> None:
    reply = admin.post("/models/no-such-model/load")
    assert reply.status_code == 404 and "no-such-model" in reply.json()["error"]["message"]
    assert admin.delete("/models/no-such-model").status_code == 404


def test_pages_follow_next_page_token_and_any_well_formed_token_is_a_cursor(admin: httpx.Client) -> None:
    queued = [queue(admin, PAGED_ASSET, "unload") for _ in range(3)]
    listed, token = [], ""
    while True:
        page = admin.get("/operations", params={"asset_id": PAGED_ASSET, "page_size": 1, "page_token": token})
        assert page.status_code == 200, page.text
        listed += [o["operation_id"] for o in page.json()["operations"]]
        token = page.json()["next_page_token"]
        if not token:
            break
    assert listed == queued[::-1]
    before_everything = admin.get("/operations", params={"page_token": f"0.{'0' * 32}"})
    assert before_everything.status_code == 200 and before_everything.json()["operations"] == []
    after_everything = admin.get("/operations", params={
        "asset_id": PAGED_ASSET, "page_token": f"{'9' * 17}.{'f' * 32}"})
    assert [o["operation_id"] for o in after_everything.json()["operations"]] == queued[::-1]


@schema.parametrize()
def test_every_operation_answers_as_its_schema_says(
    case: Case, stack: Stack, queued_operations: dict[str, str], throwaway_keys: None
) -> None:
    bound_generation(case)
    aim_at_throwaways(case, queued_operations)
    case.call_and_validate(base_url=stack.http_url, headers=stack.admin_headers)
