"""A tiny random-weight chat model with a byte-level BPE tokenizer, for constrained decoding.

The word-level tokenizer of `tiny_models` has no JSON punctuation; this one (trained on the spot
on a little JSON and prose, deterministic) can spell any text, as real tokenizers can. Two chat
templates: one with a tool slot like Qwen's (tools, assistant `tool_calls`, `tool` messages),
and plain ChatML without one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML without a tool slot (tools are ignored; a `tool` message renders like any other)."""

QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools>\nCall a function in <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' and m.get('tool_calls') %}<|im_start|>assistant\n{{ m['content'] }}"
    "{% for c in m['tool_calls'] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A template with a tool slot, shaped like Qwen 2.5's."""

_CORPUS = [
    '{"name": "Ada", "age": 36, "tags": ["math", "engines"], "active": true, "score": -1.5e3}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    "The weather in Paris is sunny today, and the museums are open until six in the evening.",
    "user assistant system tool hello world what is the answer? 0123456789 {}[]:,\"'\\/ null false",
]


def bpe_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about 400 tokens, trained on a fixed corpus."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_bpe_llama(folder: Path, chat_template: str | None = PLAIN, eos_logit: float = 0.0) -> Path:
    """A 2-layer Llama over `bpe_tokenizer`, saved to `folder`; fixed seed, peaked logits, the
    end-of-turn logit set to `eos_logit` (0: the model rarely ends on its own)."""
    tokenizer = bpe_tokenizer(chat_template)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
        model.lm_head.weight[eos].zero_()
        model.lm_head.bias = None
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
