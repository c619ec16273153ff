"""Trim a text encoder's WordPiece vocabulary to the tokens a deployment needs.

all-MiniLM-L6-v2 spends half its weights (30,522 x 384) on the token embedding table,
and a model trained on one domain reads few of those rows. Trimming keeps

- the first `keep_first` ids: BERT's WordPiece vocabulary is ordered by frequency after
  the special tokens and single characters (ids ~1,996 onwards: "the", "of", "and", ...),
  so these are the most common English words and word pieces;
- every single character and "##" + character, so any word still tokenizes without
  [UNK] (a rare word becomes more, shorter pieces);
- every token of the `must_keep` words (the training domain's vocabulary).

Ids below `keep_first` keep their number; the others are renumbered after them. For a text
whose tokens are all kept, WordPiece's greedy longest match picks the same pieces as
before (a longer match would have been a token of the full vocabulary too), so its ids map
one to one and the encoder's output is bit-identical. The export gate checks exactly that
on the probe texts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from tokenizers import Tokenizer


def kept_ids(tokenizer_json: dict, keep_first: int, must_keep: Iterable[str]) -> np.ndarray:
    """Sorted old ids to keep."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    if keep_first >= len(vocab):
        raise ValueError(f"--vocab {keep_first} does not trim a vocabulary of {len(vocab)} tokens")
    keep = set(range(keep_first))
    keep.update(i for t, i in vocab.items() if len(t) == 1 or (t.startswith("##") and len(t) == 3))
    keep.update(a["id"] for a in tokenizer_json.get("added_tokens", []))
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    for word in must_keep:
        keep.update(tok.encode(word, add_special_tokens=False).ids)
    return np.array(sorted(keep), dtype=np.int64)


def trim_tokenizer(tokenizer_json: dict, ids: np.ndarray) -> dict:
    """The same tokenizer over the kept tokens, renumbered 0..len(ids)-1 in the old order."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    new_id = {int(old): new for new, old in enumerate(ids)}
    out = json.loads(json.dumps(tokenizer_json))
    out["model"]["vocab"] = {t: new_id[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in new_id}
    for a in out.get("added_tokens", []):
        a["id"] = new_id[a["id"]]
    _renumber_specials(out.get("post_processor"), new_id)
    return out


def _renumber_specials(node, new_id: dict[int, int]) -> None:
    """TemplateProcessing stores [CLS]/[SEP] ids; keep them pointing at the same tokens."""
    if isinstance(node, dict):
        if "ids" in node and "tokens" in node:
            node["ids"] = [new_id[i] for i in node["ids"]]
        if node.get("type") == "BertProcessing":
            for key in ("sep", "cls"):
                node[key] = [node[key][0], new_id[node[key][1]]]
        for v in node.values():
            _renumber_specials(v, new_id)
    elif isinstance(node, list):
        for v in node:
            _renumber_specials(v, new_id)


def trim_embedding(src: Path, dst: Path, ids: np.ndarray, vocab_size: int) -> int:
    """Keep rows `ids` of the graph's token embedding table ([vocab_size, H], read by Gather).

    Returns the number of bytes saved."""

    model = onnx.load(str(src))
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    tables = [t for t in model.graph.initializer if t.name in gathered and len(t.dims) == 2 and t.dims[0] == vocab_size]
    if len(tables) != 1:
        raise ValueError(f"{src}: expected one [{vocab_size}, H] token embedding table, found {len(tables)}")
    table = numpy_helper.to_array(tables[0])
    trimmed = numpy_helper.from_array(np.ascontiguousarray(table[ids]), tables[0].name)
    tables[0].CopyFrom(trimmed)
    onnx.save(model, str(dst))
    return int(table.nbytes - table[ids].nbytes)
