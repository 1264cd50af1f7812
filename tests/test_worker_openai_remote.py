"""The `openai` runtime against a real OpenAI-compatible HTTP server started by the test."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from upstream_harness import KEY, serving_upstream

from services.common.assetspec import parse_spec
from services.common.errors import UpstreamError, WrongInterface
from services.worker.models import ChatParams, load_model
from services.worker.models.openai_remote import OpenAIRemoteModel


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with serving_upstream(received) as url:
        yield url, received


def remote(url: str, interface: Any = "llm-runtime", key_env: str = "OPENAI_API_KEY"):
    spec = parse_spec(
        {
            "asset_id": "remote-chat",
            "interface": interface,
            "runtime": "openai",
            "source": {
                "kind": "url",
                "url": url,
                "api_key_env": key_env,
                "upstream_model": "upstream-7b",
            },
            "metadata": {"context_length": 32768},
        }
    )
    return load_model(spec, None)


async def test_streams_chat_with_usage(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    assert isinstance(model, OpenAIRemoteModel)
    assert model.capabilities.context_length == 32768 and model.capabilities.streaming
    params = ChatParams(messages=[{"role": "user", "content": "hi"}], max_tokens=3, stop=["\n"], seed=5)
    deltas = [d async for d in model.chat(params)]
    await model.close()
    assert [d.text for d in deltas] == ["Hel", "lo", " there", ""]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.prompt_tokens == 11 and deltas[-1].usage.completion_tokens == 3
    body = received[-1]
    assert body["model"] == "upstream-7b" and body["stream"] is True
    assert body["max_tokens"] == 3 and body["stop"] == ["\n"] and body["seed"] == 5
    assert "temperature" not in body


async def test_raw_prompt_uses_completions(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, received = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url)
    deltas = [d async for d in model.chat(ChatParams(prompt="Say it", temperature=0))]
    await model.close()
    assert "".join(d.text for d in deltas) == "raw!"
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage is None
    assert received[-1]["prompt"] == "Say it" and received[-1]["temperature"] == 0


async def test_embeddings_keep_input_order(upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = upstream
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model = remote(url, interface="embedding-runtime")
    result = await model.embed(["a", "abc", [1, 2, 3, 4], "ab"])
    await model.close()
    assert [v[0] for v in result.vectors] == [1.0, 3.0, 4.0, 2.0]
    assert result.dimensions == 3
    assert result.prompt_tokens == 14  # one request for the texts, one for the token array
    with pytest.raises(WrongInterface):
        model.chat(ChatParams(prompt="x"))


async def test_wrong_key_is_an_upstream_error_without_the_key(
    upstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url, _ = upstream
    caplog.set_level("DEBUG")
    wrong = "sk-wrong-key-that-must-not-leak"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    model = remote(url, interface=["llm-runtime", "embedding-runtime"])
    with pytest.raises(UpstreamError) as caught:
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    assert "401" in caught.value.message and "Incorrect API key" in caught.value.message
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    with pytest.raises(UpstreamError) as caught:
        await model.embed(["x"])
    assert wrong not in str(caught.value)
    await model.close()
    assert "Incorrect API key" in caplog.text and wrong not in caplog.text


async def test_no_key_sends_no_auth_and_unreachable_is_upstream_error(
    upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = upstream
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = remote(url, key_env="")
    with pytest.raises(UpstreamError, match="401"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()
    model = remote(dead_url)
    with pytest.raises(UpstreamError, match="upstream request failed"):
        _ = [d async for d in model.chat(ChatParams(prompt="x"))]
    await model.close()
