"""Tiny random-weight models built on the spot, in real transformers / sentence-transformers form.

They save to folders exactly like the real ones, so the worker loads them through the same
code path. Weights come from a fixed seed: greedy outputs are the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from services.common.assetspec import AssetSpec, parse_spec

WORDS = [f"w{i}" for i in range(200)] + ["user", "assistant", "system", "tools", "hello", "hi"]
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t['function']['name'] }} "
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `WORDS`, decoding words joined by spaces."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(folder: Path, chat_template: str | None = CHATML) -> Path:
    """A 2-layer Llama with hidden size 32 and a 4096-token context, saved to `folder`."""
    tokenizer = word_tokenizer(chat_template)
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
        # Spread the logits so sampling is peaked, and keep end-of-turn at logit 0 so the
        # random model (almost) never ends on its own: outputs run to max_tokens.
        model.lm_head.weight.mul_(30.0)
        model.lm_head.weight[eos].zero_()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_sentence_model(folder: Path, max_seq_length: int = 32) -> Path:
    """A 2-layer BERT, mean pooling and normalisation, saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_models
    from tokenizers.processors import TemplateProcessing

    bert_dir = folder.parent / f"{folder.name}-bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=max_seq_length,
    )
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    transformer = st_models.Transformer(str(bert_dir), max_seq_length=max_seq_length)
    pooling = st_models.Pooling(transformer.get_embedding_dimension(), "mean")
    SentenceTransformer(modules=[transformer, pooling, st_models.Normalize()]).save(str(folder))
    return folder


def spec_for(asset_id: str, interface: str, folder: Path, **metadata: int) -> AssetSpec:
    """A transformers asset spec pointing at a local folder."""
    return parse_spec(
        {
            "asset_id": asset_id,
            "interface": interface,
            "runtime": "transformers",
            "source": {"kind": "path", "path": str(folder)},
            "metadata": metadata,
        },
        source_roots=[folder.parent],
    )
