"""GGUF to safetensors, once at install time, so later loads skip the slow GGUF dequantisation.

Loading a GGUF checkpoint with transformers dequantises every tensor (~16 s for SmolLM2-135M on
two cores); the converted safetensors folder loads in a fraction of a second. The conversion
runs in a child process (`python -m services.common.modelstore.gguf GGUF OUT`, started by
`child.convert_gguf`): a cancel can stop it, and its memory goes back to the system when it
ends. Nothing imports this module, so it runs as `__main__` without a second copy.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from services.common.modelstore.child import PROGRESS_PREFIX


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Load a GGUF causal LM and its tokenizer with transformers, save them as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(5, "loading and dequantising the GGUF weights")
    kwargs: dict[str, Any] = {"gguf_file": gguf_file.name, "dtype": torch.float32}
    dequantize = _dequantize_config()
    if dequantize is not None:
        kwargs["quantization_config"] = dequantize
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
    _report(60, "loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    _report(80, "saving safetensors")
    plain = _plain_copy(model)
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    for path in out_dir.iterdir():
        if path.is_file():
            # safetensors writes its file owner-only; other services read the store too.
            path.chmod(0o644)
    _report(100, "converted")


def _dequantize_config() -> Any:
    # Newer transformers can keep GGUF blocks packed; a packed model cannot be saved.
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def _plain_copy(model: Any) -> Any:
    """The same weights in a model without the GGUF quantizer, which refuses to be saved."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _report(percent: int, message: str) -> None:
    print(f"{PROGRESS_PREFIX}{percent} {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line of the child process: `GGUF_FILE OUT_DIR`."""
    parser = argparse.ArgumentParser(description="Convert a GGUF causal LM to safetensors.")
    parser.add_argument("gguf_file", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    convert(args.gguf_file, args.out_dir)


if __name__ == "__main__":
    main()
