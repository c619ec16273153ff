"""The reduced-precision gates: a flip at a tie is compared with its own choice; drift is not.

The gate logic (`export/gates.py parity`) runs on hand-made detections here, so each case
is exact: what an fp16 graph does at a proposal tie, and what real precision loss looks like."""

from __future__ import annotations

import numpy as np
import pytest

from reir.export import gates as G

K, D = 4, 16


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return G.probe_set(tmp_path_factory.mktemp("probe"), 40)


def _reference(n_images: int):
    rng = np.random.default_rng(0)
    boxes = np.zeros((n_images, K, 4), np.float32)
    for i in range(K):  # four disjoint boxes per image
        boxes[:, i] = [10 + 30 * i, 10, 30 + 30 * i, 40]
    emb = rng.normal(size=(n_images, K, D)).astype(np.float32)
    return boxes, np.ones((n_images, K), np.float32), emb, np.full(n_images, K, np.int64)


def _fn(out):
    return lambda images: tuple(a[: len(images)] for a in out)


def _text(texts):
    return np.ones((len(texts), D), np.float32)


def _swap_in_image0(out):
    """What a proposal-rank exchange does: the same two boxes with each other's content query,
    here a different embedding (another valid answer, cosine far from the fp32 one)."""
    boxes, scores, emb, n = (a.copy() for a in out)
    rng = np.random.default_rng(1)
    emb[0, :2] = rng.normal(size=(2, D))
    return boxes, scores, emb, n


def test_a_flip_at_a_tie_is_compared_with_the_choice_it_took(probe):
    ref = _reference(G.PARITY_IMAGES)
    flipped = _swap_in_image0(ref)
    cand = (_fn(flipped), _text)
    alone = G.parity((_fn(ref), _text), cand, probe, (64, 64))
    assert alone["instance_mean_cos"] < 0.999 and alone["instance_proposal_flips"] == 0
    explained = G.parity((_fn(ref), _text), cand, probe, (64, 64), tie_proposals=lambda images: [flipped])
    assert explained["instance_mean_cos"] == pytest.approx(1.0, abs=1e-6)
    assert explained["instance_proposal_flips"] == pytest.approx(2 / (G.PARITY_IMAGES * K))
    gates = G.gate_reduced("fp16", explained, {"BR@1(0.5)": 50, "mBR@1(0.5)": 50}, {"BR@1(0.5)": 50, "mBR@1(0.5)": 50})
    assert gates[1].passed


def test_precision_loss_is_not_explained_away_by_tie_alternatives(probe):
    """fp16-like drift on every instance (cosine ~0.995): alternatives that are the reference
    itself or unrelated answers explain nothing, and the instance gate fails."""
    ref = _reference(G.PARITY_IMAGES)
    rng = np.random.default_rng(2)
    boxes, scores, emb, n = ref
    drifted = (boxes, scores, emb + 0.1 * np.abs(emb).mean() * rng.normal(size=emb.shape).astype(np.float32), n)
    unrelated = (boxes, scores, rng.normal(size=emb.shape).astype(np.float32), n)
    par = G.parity(
        (_fn(ref), _text), (_fn(drifted), _text), probe, (64, 64), tie_proposals=lambda images: [ref, unrelated]
    )
    assert par["instance_mean_cos"] < 0.999 and par["instance_proposal_flips"] == 0
    gates = G.gate_reduced("fp16", par, {"BR@1(0.5)": 50, "mBR@1(0.5)": 50}, {"BR@1(0.5)": 50, "mBR@1(0.5)": 50})
    assert not gates[1].passed and "instance mean cosine" in gates[1].name
