"""Constrained decoding with xgrammar: compiled grammars per model, one matcher per sequence.

xgrammar was chosen by measurement (`bench/grammar_engines.py`, figures in bench/README.md): on
this machine's CPU, with SmolLM2's 49k-token vocabulary, it had the lowest cost per token (mask
plus advance) among llguidance, xgrammar and outlines-core, builds its tokenizer info in a
fraction of llguidance's time, and expresses all we need (JSON schemas, any JSON object, and the
tool-call grammar as a structural tag).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import torch
import xgrammar as xgr

from services.common.errors import InvalidArgument
from services.worker.models.engine.constraint import Constraint
from services.worker.models.structured.spec import MAX_WHITESPACE, grammar_spec, spec_key
from services.worker.models.types import ChatParams

CACHED_GRAMMARS = 64
"""Compiled grammars kept per model (least recently used dropped first)."""


class GrammarConstraint(Constraint):
    """One sequence's grammar state (an xgrammar matcher); used from the engine's thread."""

    def __init__(self, compiled: xgr.CompiledGrammar, stop_ids: list[int]) -> None:
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids)

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (EOS only once the grammar may end
        and nothing else may follow)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def advance(self, token_id: int) -> None:
        """Take the drawn token."""
        if not self._matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was drawn though the grammar did not allow it")

    @property
    def finished(self) -> bool:
        """Whether the grammar ended (its stop token taken)."""
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """A model's grammar compiler: its tokenizer info is built once, compiled grammars are kept
    by their description (see `spec.spec_key`) so a repeated schema does not compile again, and
    requests that miss the same description together wait for one compilation.

    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's vocabulary;
    the ids past it are never allowed); `stop_ids` are the model's end-of-sequence ids.
    Thread-safe: requests compile from worker threads. What a request brings is bounded before
    it gets here (`services.common.request_schemas`).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        # A grammar ends on a stop token: a model without an end token gets a special token as
        # its stand-in (decoded as nothing), so a complete answer still ends its sequence.
        stop_ids = list(stop_ids) or [next(iter(getattr(tokenizer, "all_special_ids", [])), vocab_size - 1)]
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._stop_ids = list(stop_ids)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._compiling: dict[str, Future[xgr.CompiledGrammar]] = {}
        self._lock = threading.Lock()
        self.compilations = 0
        """Grammars compiled so far (cache misses)."""

    def constraint(self, params: ChatParams) -> GrammarConstraint | None:
        """A fresh constraint for one sequence of the request, or None when its answer is free
        text. Blocking at a cache miss (compilation): call from a thread. Raises
        `InvalidArgument` for a schema the engine cannot compile."""
        spec = grammar_spec(params)
        if spec is None:
            return None
        return GrammarConstraint(self.compiled(spec), self._stop_ids)

    def compiled(self, spec: dict[str, Any]) -> xgr.CompiledGrammar:
        """The compiled grammar of a description, from the cache when it was compiled before, or
        from the compilation another request has under way. Raises `InvalidArgument` when the
        engine cannot compile it."""
        key = spec_key(spec)
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return hit
            running = self._compiling.get(key)
            if running is None:
                mine: Future[xgr.CompiledGrammar] = Future()
                self._compiling[key] = mine
        if running is not None:
            try:
                return running.result()
            except InvalidArgument as exc:  # each waiter raises its own
                raise InvalidArgument(exc.message, exc.problems) from None
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            error = InvalidArgument(f"the JSON schema cannot be enforced: {_first_line(exc)}")
            self._settle(key, mine, error)
            raise error from None
        except BaseException as exc:
            self._settle(key, mine, exc)
            raise
        self._settle(key, mine, compiled)
        return compiled

    def _settle(self, key: str, future: Future[xgr.CompiledGrammar],
                outcome: xgr.CompiledGrammar | BaseException) -> None:
        """End the compilation of `key`: cache its grammar (not its failure) and hand the
        outcome to the requests waiting for it."""
        with self._lock:
            del self._compiling[key]
            if not isinstance(outcome, BaseException):
                self.compilations += 1
                self._cache[key] = outcome
                while len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _compile(self, spec: dict[str, Any]) -> xgr.CompiledGrammar:
        if spec["type"] == "json_schema_bounded":
            return self._compiler.compile_grammar(_json_grammar(spec["schema"]))
        return self._compiler.compile_structural_tag({"type": "structural_tag", "format": _to_xgrammar(spec)})


_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _json_grammar(schema: dict[str, Any]) -> str:
    """EBNF for JSON following `schema`, whitespace runs bounded.

    xgrammar writes the characters of length-bounded strings as `[^"\\\r\n]`, which lets
    control characters through (a tab, say) that JSON forbids unescaped; they are excluded here.
    """
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True,
                                           max_whitespace_cnt=MAX_WHITESPACE)
    return str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def _to_xgrammar(element: dict[str, Any]) -> dict[str, Any]:
    """A description element as xgrammar's structural tag format (bounded JSON as EBNF)."""
    kind = element["type"]
    if kind == "json_schema_bounded":
        return {"type": "grammar", "grammar": _json_grammar(element["schema"])}
    if kind in ("sequence", "or"):
        return {"type": kind, "elements": [_to_xgrammar(e) for e in element["elements"]]}
    if kind == "star":
        return {"type": "star", "content": _to_xgrammar(element["content"])}
    return element


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    # xgrammar prefixes its messages with a time and a source location.
    return re.sub(r"^\[[^\]]*\] \S+:\d+: ", "", lines[-1]) if lines else type(exc).__name__
