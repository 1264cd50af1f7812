"""A small steady load through the official `openai` client, and what each request ended as.

Two chat streams and one embedding loop run side by side, each request with a deadline of its
own (`CLIENT_DEADLINE_S`). Every outcome is kept with its times and a verdict:

- `ok`;
- `clean`: an OpenAI-shaped error (a JSON body, or a stream's last event, with `error.type`,
  `code` and `message`) of a type that says "try again later";
- `misleading`: OpenAI-shaped, but of a type that blames the request or says the server broke;
- `connection`: refused or reset (clean only where the router itself went away);
- `hang`: the client's deadline passed;
- `unclean`: anything else (a stream that stopped without a finish reason, a body that is not
  an OpenAI error...).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

RETRY_LATER = frozenset({"service_unavailable_error", "timeout_error", "rate_limit_error", "upstream_error"})
"""Error types that tell a client to try again later: the only right answers to a fault. Any
other (`invalid_request_error`, `model_error`, `server_error`...) blames the request, or is a
bug, while the request was fine."""
CLIENT_DEADLINE_S = 20.0
"""What a client waits for a whole request, stream included, before calling it hung."""
PACE_S = 0.1
"""Pause between two requests of one loop, so that two cores keep up."""
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@dataclass
class Outcome:
    """How one request ended."""

    kind: str
    """`chat` (a stream) or `embedding`."""
    request_id: str
    started: float
    """`time.monotonic()` when it was sent."""
    ended: float
    verdict: str = "ok"
    label: str = "ok"
    """What it ended as, in a few words (failures are counted by it)."""
    detail: str = ""

    @property
    def latency_s(self) -> float:
        """Seconds from sending to the end of the answer (or the error)."""
        return self.ended - self.started


def is_openai_error_body(body: object) -> bool:
    """Whether `body` is OpenAI's `error` object: non-empty `type`, `code` and `message`."""
    return isinstance(body, dict) and all(
        isinstance(body.get(name), str) and body[name] for name in ("type", "code", "message"))


def judge(exc: BaseException) -> tuple[str, str, str]:
    """The verdict, a short label (`HTTP 503 model_not_ready`, `stream error timeout`...) and a
    one-line description of a failed request."""
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return "hang", "no answer", f"no answer within {CLIENT_DEADLINE_S:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return "connection", f"connection {type(cause).__name__}", f"{type(cause).__name__}: {cause}"
    if isinstance(exc, openai.APIError):
        # A status error has a JSON body; a stream's `data: {"error": ...}` event raises the base.
        where = f"HTTP {exc.status_code}" if isinstance(exc, openai.APIStatusError) else "stream error"
        detail = f"{where} {exc.body!r}"[:300]
        if not is_openai_error_body(exc.body):
            return "unclean", f"{where} (not an OpenAI error)", detail
        assert isinstance(exc.body, dict)
        verdict = "clean" if exc.body["type"] in RETRY_LATER else "misleading"
        return verdict, f"{where} {exc.body['code']}", detail
    return "unclean", type(exc).__name__, f"{type(exc).__name__}: {exc}"[:300]


class SteadyLoad:
    """`chats` concurrent chat-stream loops and `embeddings` embedding loops until `stop()`."""

    def __init__(self, base_url: str, api_key: str, *, chats: int = 2, embeddings: int = 1,
                 chat_model: str, embedding_model: str) -> None:
        self.outcomes: list[Outcome] = []
        self._api = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                       timeout=CLIENT_DEADLINE_S)
        self._chat_model, self._embedding_model = chat_model, embedding_model
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        loops = [("chat", self._chat)] * chats + [("embedding", self._embed)] * embeddings
        self._tasks = [asyncio.create_task(self._loop(kind, call)) for kind, call in loops]

    async def stop(self) -> None:
        """Let every request in flight end (each has its deadline), then stop the loops."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        await self._api.close()

    def successes(self, kind: str, sent_after: float) -> int:
        """Requests of that kind sent after `sent_after` (monotonic) that succeeded."""
        return sum(1 for o in self.outcomes
                   if o.kind == kind and o.verdict == "ok" and o.started >= sent_after)

    async def wait_for_successes(self, count: int, sent_after: float, timeout: float) -> None:
        """Until `count` chats and `count` embeddings sent after `sent_after` succeeded."""
        async with asyncio.timeout(timeout):
            while min(self.successes("chat", sent_after), self.successes("embedding", sent_after)) < count:
                self._changed.clear()
                await self._changed.wait()

    async def _loop(self, kind: str, call: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        while not self._stopping.is_set():
            request_id = f"chaos-{uuid.uuid4().hex[:12]}"
            started = time.monotonic()
            try:
                async with asyncio.timeout(CLIENT_DEADLINE_S):
                    await call({"x-request-id": request_id})
                outcome = Outcome(kind, request_id, started, time.monotonic())
            except Exception as exc:  # every failure is an outcome to judge, none stops the load
                outcome = Outcome(kind, request_id, started, time.monotonic(), *judge(exc))
            self.outcomes.append(outcome)
            self._changed.set()
            try:
                await asyncio.wait_for(self._stopping.wait(), PACE_S)
            except TimeoutError:
                pass

    async def _chat(self, headers: dict[str, Any]) -> None:
        stream = await self._api.chat.completions.create(
            model=self._chat_model, messages=HELLO, max_tokens=8, stream=True,
            extra_headers=headers)
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        if finish is None:
            raise AssertionError("the stream ended without a finish reason or an error event")

    async def _embed(self, headers: dict[str, Any]) -> None:
        answer = await self._api.embeddings.create(model=self._embedding_model, input="a steady load",
                                                   extra_headers=headers)
        if not answer.data or not answer.data[0].embedding:
            raise AssertionError("an embedding answer without a vector")
