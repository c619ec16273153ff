"""Does the text encoder know the novel lexicon? A probe for the `test-novel` split.

`test-novel` phrases the test queries with words no train expression contains ("scarlet",
"lozenge", "west of"). Training can only teach the train words, so a novel query is
answered right only where the pretrained encoder already puts each novel word nearer its
train synonym than any other train word of its kind. This probe measures exactly that,
word by word, in the encoder's sentence space (mean-pooled, normalised), and so bounds
what any training of the rest of the model can reach on that split.

    python -m reir.training.probes.synonyms [CHECKPOINT]   # no checkpoint: the pretrained MiniLM
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reir.datasets.synth import WORDS

from ..checkpoint import load_model
from ..config import TextConfig
from ..text_branch import TextBranch, load_tokenizer, tokenize

KINDS = ("color", "shape", "size", "fill", "relation")


@dataclass
class SynonymHit:
    kind: str
    novel: str
    nearest: str  # the train word nearest the novel one
    correct: bool  # that train word means the same


def synonym_probe(encode: Callable[[list[str]], torch.Tensor]) -> list[SynonymHit]:
    """encode: texts -> [N, D] L2-normalised sentence embeddings."""
    hits = []
    for kind in KINDS:
        train = [(v, w) for v, (words, _) in WORDS[kind].items() if v is not None for w in words]
        novel = [(v, w) for v, (_, words) in WORDS[kind].items() if v is not None for w in words]
        nearest = (encode([w for _, w in novel]) @ encode([w for _, w in train]).T).argmax(1)
        for (value, w), j in zip(novel, nearest.tolist(), strict=True):
            hits.append(SynonymHit(kind, w, train[j][1], train[j][0] == value))
    return hits


def sentence_encoder(checkpoint: str | None) -> Callable[[list[str]], torch.Tensor]:
    if checkpoint:
        cfg, model = load_model(checkpoint)
        text_cfg, encoder = cfg.model.text, model.text
    else:
        text_cfg = TextConfig(encoder="minilm")
        encoder = TextBranch(text_cfg).eval()
    tokenizer = load_tokenizer(text_cfg)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        enc = tokenize(tokenizer, texts, text_cfg.max_length)
        return encoder(enc["input_ids"], enc["attention_mask"])

    return encode


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", help="a training checkpoint; default: the pretrained MiniLM")
    args = p.parse_args(argv)
    hits = synonym_probe(sentence_encoder(args.checkpoint))
    for kind in KINDS:
        row = [f"{h.novel} -> {h.nearest}{'' if h.correct else ' (wrong)'}" for h in hits if h.kind == kind]
        print(f"{kind}: " + "; ".join(row))
    print(f"novel words nearest a train synonym: {sum(h.correct for h in hits)}/{len(hits)}")


if __name__ == "__main__":
    main()
