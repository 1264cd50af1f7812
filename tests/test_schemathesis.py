"""Schemathesis over every `/v1` and `/admin/v1` operation of a real stack, and the admin API's
exact inputs.

The stack (registry, worker, jobs, router) runs in-process with the tiny random-weight models,
on an event loop of its own thread: schemathesis' tests are synchronous and call the router
over HTTP. Schemathesis reads the app's OpenAPI document, built at import so that pytest lists
one test per operation (a test checks it is the document the router serves), narrowed only
where a value is valid per model or per request, which no schema can state: the destructive
admin routes (install, load, unload, delete, cancel, key revoke) may only name throwaway
assets, their operations and throwaway keys, so a fuzzed delete never removes a model the
other operations use nor a revoke the admin key every call sends; an inference request names a
real model or an unknown one, so requests reach the worker; logit biases name the tiny model's
token ids; a named tool choice (which must name one of the request's tools) is left out; a
Messages API conversation ends with the user's turn (the test appends one to the cases the
schema allows, as no schema can single out the last item); and every generation is bounded to a
few tokens (the test lowers `max_tokens` and `n` of the cases the schema allows before sending).
Checks: no server error, no request the schema allows refused as invalid, none it forbids
accepted, every status, header, content type and body documented, every error in OpenAI's
shape (Anthropic's on the Messages API), and 405 for an undeclared method. Examples are bounded per operation and
derandomized, so CI sends the same cases each time; a summary (operations, examples sent,
failures) is written to the test log at the end of the module."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import threading
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case
from schemathesis.checks import CheckFunction
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from stack_harness import TINY_CHAT, TINY_EMBED, Stack, build_sources, running_stack, tiny_documents

from services.common.inference_requests import MAX_MESSAGES
from services.router.http.anthropic.errors import TOO_LONG
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
TINY_TOKEN_ID = "^(0|[1-9][0-9]?|1[0-9]{2}|20[0-9])$"
"""The tiny chat model's token ids (0-209): a bias of any other is refused."""
MAX_TOKENS, MAX_CHOICES = 4, 2
MESSAGES, COUNT_TOKENS = "/v1/messages", "/v1/messages/count_tokens"
ANTHROPIC_PATHS = (MESSAGES, COUNT_TOKENS)
"""Anthropic's Messages API: its errors have Anthropic's shape."""
USER_TURN = {"role": "user", "content": "Go on."}
EXAMPLES_PER_OPERATION = 50
CHECKS = ("not_a_server_error", "status_code_conformance",
          "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance", "unsupported_method", "negative_data_rejection")
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


@dataclass
class Tally:
    """What the fuzzing sent: examples per operation and generation mode, and those that failed."""

    sent: Counter[tuple[str, str]] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        """The summary, one line per operation and a total."""
        operations = sorted({label for label, _ in self.sent})
        rows = [f"{label}: {self.sent[label, 'positive']} positive, {self.sent[label, 'negative']} "
                f"negative, {self.failed[label]} failing" for label in operations]
        modes = Counter[str]()
        for (_, mode), count in self.sent.items():
            modes[mode] += count
        failing = [label for label in operations if self.failed[label]]
        total = (f"{len(operations)} operations, {sum(modes.values())} examples ({modes['positive']} "
                 f"positive, {modes['negative']} negative), {len(failing)} operations failing")
        return [*rows, f"{total}: {', '.join(failing)}" if failing else total]


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Counts of the fuzzed examples, written to the test log once the module is done."""
    counted = Tally()
    yield counted
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not counted.sent:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "schemathesis summary")
        for line in counted.lines():
            reporter.write_line(line)


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
                         ("/v1/completions", [TINY_CHAT]), ("/v1/embeddings", [TINY_EMBED]),
                         (MESSAGES, [TINY_CHAT, "tiny-alias"]), (COUNT_TOKENS, [TINY_CHAT])):
        properties = _body_schema(document, path)["properties"]
        properties["model"] = {"type": "string", "enum": [*models, UNKNOWN_MODEL]}
    # Like `model`, these are only valid per model, so they are pinned to the tiny model's:
    # `dimensions` (its vector size) and token ids (its vocabulary). How many tokens an input
    # may have is per model too: see `within_the_models_context`.
    embedding = _body_schema(document, "/v1/embeddings")["properties"]
    embedding["dimensions"] = {"anyOf": [{"type": "integer", "enum": [TINY_EMBED_DIMENSIONS]}, {"type": "null"}]}
    _bound_token_ids(embedding["input"], TINY_VOCABULARY - 1)
    # The tiny tokenizer splits on whitespace alone: a blank prompt has no token to start from.
    _not_blank(_body_schema(document, "/v1/completions")["properties"]["prompt"])
    # Biased token ids are the tiny model's too.
    for path in ("/v1/chat/completions", "/v1/completions"):
        bias = _body_schema(document, path)["properties"]["logit_bias"]["anyOf"][0]
        bias["propertyNames"] = {"pattern": TINY_TOKEN_ID}
    # A named tool choice must name one of the request's tools, which no schema can state.
    chat = _body_schema(document, "/v1/chat/completions")["properties"]
    chat["tool_choice"]["anyOf"] = [b for b in chat["tool_choice"]["anyOf"] if "$ref" not in b]
    for path in ANTHROPIC_PATHS:
        choices = _body_schema(document, path)["properties"]["tool_choice"]["anyOf"][0]
        choices["oneOf"] = [c for c in choices["oneOf"] if not c["$ref"].endswith("/ToolChoiceTool")]
        del choices["discriminator"]["mapping"]["tool"]
    return document


def _not_blank(schema: Any) -> None:
    """Every string below `schema` holds something besides whitespace."""
    if isinstance(schema, dict):
        if schema.get("type") == "string":
            schema["pattern"] = r"\S"
        for value in schema.values():
            _not_blank(value)
    elif isinstance(schema, list):
        for value in schema:
            _not_blank(value)


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
    # The test authenticates every case itself (the admin key): no fuzzed key headers.
    "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True,
                   "with-security-parameters": False},
    "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    "output": {"sanitization": {"enabled": False}},
})
# The event feed (`/admin/v1/events`) streams until the client leaves, so it is not fuzzed;
# tests/test_events_feed.py checks it.
schema = schemathesis.openapi.from_dict(fuzzing_view(DOCUMENT), config=CONFIG).include(
    path_regex=FUZZED_PATHS).exclude(path="/admin/v1/events")


def is_negative(case: Case) -> bool:
    """Whether the case breaks the schema on purpose."""
    return case.meta is not None and case.meta.generation.mode.is_negative


def bound_generation(case: Case) -> None:
    """At most `MAX_TOKENS` tokens and `MAX_CHOICES` choices per generation, so each stays short.

    A case that breaks the schema is sent as generated (the server refuses it before any
    generation); lowering its values could make it valid."""
    if case.path not in ("/v1/chat/completions", "/v1/completions", MESSAGES) or not isinstance(case.body, dict):
        return
    body = dict(case.body)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_TOKENS
    if not is_negative(case):
        for name, bound in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS),
                            ("n", MAX_CHOICES), ("best_of", MAX_CHOICES)):
            value = body.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > bound:
                body[name] = bound
    if body != case.body:
        case.body = body


def end_with_a_user_turn(case: Case) -> None:
    """A Messages API conversation the schema allows ends with the user's turn: the rule
    (documented on `messages`) is about the last item, which JSON Schema cannot single out.
    A case that breaks the schema is sent as generated; one as long as allowed loses its last
    turn to the user's."""
    if case.path not in ANTHROPIC_PATHS or is_negative(case) or not isinstance(case.body, dict):
        return
    messages: Any = case.body.get("messages")
    if isinstance(messages, list) and messages and messages[-1].get("role") != "user":
        turns: list[Any] = [*messages[:MAX_MESSAGES - 1], USER_TURN]
        case.body = {**case.body, "messages": turns}


def aim_at_throwaways(case: Case, queued_operations: dict[str, str]) -> bool:
    """Stand-ins become the real operations, in the cases the schema allows (a case that breaks
    it stays broken); a case built outside the document's enums (coverage's negative ones)
    still names no real model nor key. True when a stand-in was replaced: the document does
    not list the real id, yet the case is one it allows."""
    parameters = dict(case.path_parameters) if isinstance(case.path_parameters, dict) else {}
    stand_in = parameters.get("operation_id") in queued_operations and not is_negative(case)
    if stand_in:
        parameters["operation_id"] = queued_operations[parameters["operation_id"]]
    if case.path.startswith("/admin/v1/models/") and parameters.get("asset_id") in (TINY_CHAT, TINY_EMBED):
        parameters["asset_id"] = UNKNOWN_MODEL
    if case.path == "/admin/v1/keys/{name}" and parameters.get("name") not in THROWAWAY_KEYS:
        parameters["name"] = "no-such-key"
    if parameters != case.path_parameters:
        case.path_parameters = parameters
    return stand_in


def adds_undeclared_header(case: Case) -> bool:
    """Whether the case sends a header neither its operation nor the API keys declare."""
    operation = DOCUMENT["paths"][case.operation.path][case.operation.method.lower()]
    declared = {p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"}
    declared |= {s.get("name", "authorization").lower()
                 for s in DOCUMENT["components"]["securitySchemes"].values()}
    return any(name.lower() not in declared for name in case.headers or {})


def within_the_models_context(ctx: Any, response: Response, case: Case) -> bool | None:
    """`positive_data_acceptance`, but for a refusal of a text longer than the model reads
    (tokens per input, context length): a limit of each model, which no schema can state."""
    error = _error(response)
    too_long = (str(error.get("message", "")).startswith(TOO_LONG) if case.path in ANTHROPIC_PATHS
                else error.get("code") == "context_length_exceeded")
    if response.status_code == 400 and too_long:
        return None
    return positive_data_acceptance(ctx, response, case)


def _error(response: Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def api_error(ctx: Any, response: Response, case: Case) -> None:
    """Every error answer is OpenAI's `{"error": {"message", "type", ...}}`, with a message, or
    on the Messages API Anthropic's `{"type": "error", "error": {"type", "message"}}`."""
    if response.status_code < 400:
        return
    error = _error(response)
    shaped = isinstance(error.get("type"), str) and isinstance(error.get("message"), str) and error["message"]
    if case.path in ANTHROPIC_PATHS:
        if not (shaped and response.json().get("type") == "error"):
            raise AssertionError(f"{response.status_code} not in Anthropic's error shape: {response.text[:300]!r}")
    elif not shaped:
        raise AssertionError(f"{response.status_code} not in OpenAI's error shape: {response.text[:300]!r}")


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
        # Each protocol has its error shape (OpenAI's `ErrorResponse`, Anthropic's...).
        assert schema_ref and schema_ref["$ref"].endswith("ErrorResponse"), label


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


@pytest.mark.parametrize("method, url, body, param", [
    ("POST", f"/models/{LIFECYCLE_ASSETS[0]}/unload", {"force": 0}, "force"),
    ("POST", "/keys", {"name": "fuzz-typed", "admin": 1}, "admin"),
    ("POST", "/keys", {"name": "fuzz-typed", "rpm": "5"}, "rpm"),
    ("POST", "/keys", {"name": "fuzz-typed", "tpm": 2.5}, "tpm"),
    ("GET", "/usage?until=0.5", None, "until"),
    ("GET", "/usage?since=1700000000", None, "since"),
])
def test_a_value_of_another_json_type_is_a_400_naming_it(
    admin: httpx.Client, method: str, url: str, body: dict[str, Any] | None, param: str
) -> None:
    reply = admin.request(method, url, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_an_integral_float_is_an_integer(admin: httpx.Client) -> None:
    created = admin.post("/keys", json={"name": "fuzz-integral", "tpm": 1e9, "budget_tokens": 5.0})
    assert created.status_code == 201, created.text
    assert (created.json()["tpm"], created.json()["budget_tokens"]) == (10**9, 5)
    assert admin.delete("/keys/fuzz-integral").status_code == 200


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
    case: Case, stack: Stack, queued_operations: dict[str, str], throwaway_keys: None, tally: Tally
) -> None:
    bound_generation(case)
    end_with_a_user_turn(case)
    label = f"{case.operation.method.upper()} {case.operation.path}"
    tally.sent[label, "negative" if is_negative(case) else "positive"] += 1
    # HTTP servers take headers they do not know: a case negated only by adding one is valid.
    allowed = aim_at_throwaways(case, queued_operations) or adds_undeclared_header(case)
    excluded: list[CheckFunction] = [negative_data_rejection] if allowed else []
    try:
        case.call_and_validate(base_url=stack.http_url, headers=stack.admin_headers,
                               additional_checks=[within_the_models_context, api_error],
                               excluded_checks=excluded)
    except BaseException:
        tally.failed[label] += 1
        raise
