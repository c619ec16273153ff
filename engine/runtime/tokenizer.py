"""Tokenisation with the `tokenizers` package alone (no transformers on a serving host).

Expressions are cleaned exactly as in training (`reir.engine.runtime.expressions.clean_expression`),
then encoded with the bundle's `tokenizer.json`, truncated at the model's max length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reir.engine.runtime.expressions import clean_expression


class Tokenizer:
    def __init__(self, path: str | Path, max_length: int, pad_id: int, pad_token: str, pad_to_max: bool = False):
        from tokenizers import Tokenizer as HFTokenizer  # the engine extra: a core install runs `reir synth`

        self.tok = HFTokenizer.from_file(str(path))
        self.tok.enable_truncation(max_length)
        if pad_to_max:
            self.tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
        else:
            self.tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length

    def __call__(self, texts: list[str], cleaned: bool = False) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """ids [B, L] int64, attention mask [B, L] int64, and which texts were truncated."""
        encs = self.tok.encode_batch(texts if cleaned else [clean_expression(t) for t in texts])
        ids = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(texts), -1)
        return ids, mask, [bool(e.overflowing) for e in encs]
