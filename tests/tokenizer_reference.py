"""transformers' own tokenizer for a GGUF file (built as `tokenizer.json` by models/convert.py), the
reference models/spm_tokenizer.py must agree with."""

from __future__ import annotations

from pathlib import Path

from models.convert import build_tokenizer
from models.gguf_file import read_header


def transformers_tokenizer(gguf_path: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text, config = build_tokenizer(read_header(gguf_path))
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text),
                                   **{k: config[k] for k in keys if config.get(k) is not None})
