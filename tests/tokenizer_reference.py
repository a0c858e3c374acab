"""transformers' own tokenizer for a GGUF file, the reference models/spm_tokenizer.py must agree with:
`tokenizer.json` as models/convert.py builds it for other families, loaded by the app's own loader."""

from __future__ import annotations

import tempfile
from pathlib import Path

from models.convert import build_tokenizer, save_tokenizer
from models.gguf_file import read_header
from models.loader import load_tokenizer


def transformers_tokenizer(gguf_path: Path):
    with tempfile.TemporaryDirectory(prefix="tokenizer-reference-") as folder:
        save_tokenizer(*build_tokenizer(read_header(gguf_path)), Path(folder))
        return load_tokenizer(Path(folder))  # read whole into the Rust backend: the folder may go
