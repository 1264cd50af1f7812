"""A tiny GGUF file built on the spot: random weights, the real format.

`write_tiny_gguf` writes a 2-layer llama GGUF (float32 tensors, a small byte-pair vocabulary,
a chat template) that transformers loads like a downloaded one, in about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer, 32-wide llama GGUF file with a small byte-pair vocabulary."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(ord("a"), ord("z") + 1)], "ab", "cd"]
    hidden, layers, heads, kv_heads, ffn = 32, 2, 4, 2, 64
    head_dim = hidden // heads
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "c d"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def dense(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(name: str) -> None:
        writer.add_tensor(name, np.ones(hidden, np.float32))

    dense("token_embd.weight", len(tokens), hidden)
    ones("output_norm.weight")
    dense("output.weight", len(tokens), hidden)
    for i in range(layers):
        ones(f"blk.{i}.attn_norm.weight")
        dense(f"blk.{i}.attn_q.weight", hidden, hidden)
        dense(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        dense(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        dense(f"blk.{i}.attn_output.weight", hidden, hidden)
        ones(f"blk.{i}.ffn_norm.weight")
        dense(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        dense(f"blk.{i}.ffn_up.weight", ffn, hidden)
        dense(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
