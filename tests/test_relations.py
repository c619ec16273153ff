"""Relation slots (training/relations.py) and the terms that teach them
(training/relation_loss.py): what each slot holds, what the query asks, that the score is
the sum the module docstring promises, and that both sides export with the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from reir.datasets.synth.scene import SceneObject  # noqa: E402
from reir.training.relation_loss import (  # noqa: E402
    NO_RELATION,
    UNKNOWN,
    anchor_loss,
    relation_targets,
    relation_type_loss,
)
from reir.training.relations import RELATIONS, AnchorCode, RelationQuery, RelationSlots  # noqa: E402

D, A = 16, 8
TINY = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"


def _scene():
    """Instance 0 in the middle; 1 far to its right, 2 far below it, 3 touching its left side."""
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.9, 0.5, 0.1, 0.1], [0.5, 0.9, 0.1, 0.1], [0.41, 0.5, 0.08, 0.1]]])
    torch.manual_seed(0)
    return torch.randn(1, 4, D), boxes, torch.full((1, 4), 8.0)


def test_gates_follow_the_relation_words():
    slots = RelationSlots(D, A)
    _, boxes, _ = _scene()
    with torch.no_grad():
        g = slots.gates(boxes)[0, 0]  # [j, r]: where each other instance lies, seen from 0
    r = {name: n for n, name in enumerate(RELATIONS)}
    assert g[1, r["left_of"]] > 0.99 and g[1, r["right_of"]] < 0.01  # 0 is left of 1
    assert g[2, r["above"]] > 0.99 and g[2, r["below"]] < 0.01  # 0 is above 2 (y points down)
    assert g[3, r["next_to"]] > 0.95 and g[1, r["next_to"]] < 0.01  # 3 touches 0; 1 is 0.3 away
    assert g[3, r["right_of"]] < 0.5  # centres 0.09 apart: inside the 0.1 margin


def test_a_slot_sums_the_anchor_codes_of_the_neighbours_on_its_side():
    slots = RelationSlots(D, A).eval()
    emb, boxes, obj = _scene()
    with torch.no_grad():
        out, codes = slots(emb, boxes, obj)
        by_slot = out.view(1, 4, len(RELATIONS), A)
        weight = slots.gates(boxes) * torch.sigmoid(obj)[:, None, :, None]
        weight = weight * (1 - torch.eye(4))[None, :, :, None]
        want = torch.einsum("bijr,bjk->birk", weight, codes)
    torch.testing.assert_close(by_slot, want)
    left = RELATIONS.index("left_of")
    # Instance 0's left_of slot is instance 1's code, the only one on its right (instance 2,
    # straight below, leaks in by its gate at offset 0: sigmoid(-5) = 0.7%).
    cos = torch.nn.functional.cosine_similarity(by_slot[0, 0, left], codes[0, 1], dim=0)
    assert float(cos) > 0.999
    # A background query (objectness -30) counts as if it were absent.
    gone = obj.clone()
    gone[0, 1] = -30.0
    keep = [0, 2, 3]
    with torch.no_grad():
        alone = slots(emb[:, keep], boxes[:, keep], obj[:, keep])[0][0, 0]
        torch.testing.assert_close(slots(emb, boxes, gone)[0][0, 0], alone, atol=1e-6, rtol=0)
        # An instance never counts itself: its own code moves none of its slots.
        itself = emb.clone()
        itself[0, 0] += 1.0
        torch.testing.assert_close(slots(itself, boxes, obj)[0][0, 0], out[0, 0])


def test_no_gradient_reaches_boxes_or_objectness():
    slots = RelationSlots(D, A)
    emb, boxes, obj = _scene()
    for t in (emb, boxes, obj):
        t.requires_grad_(True)
    slots(emb, boxes, obj)[0].sum().backward()
    assert boxes.grad is None and obj.grad is None and float(emb.grad.abs().sum()) > 0


def test_the_query_asks_one_slot_and_none_asks_nothing():
    rq = RelationQuery(12)
    anchor = torch.randn(2, A)
    none = torch.tensor([[0, 0, 0, 0, 0, 30.0]]).expand(2, -1)
    assert float(rq.slots(none, anchor).abs().max()) < 1e-9
    above = RELATIONS.index("above")
    asks_above = torch.zeros(2, len(RELATIONS) + 1)
    asks_above[:, above] = 30.0
    out = rq.slots(asks_above, anchor).view(2, len(RELATIONS), A)
    torch.testing.assert_close(out[:, above], anchor)
    assert float(out[:, [r for r in range(len(RELATIONS)) if r != above]].abs().max()) < 1e-9


def test_supervised_slots_take_no_gradient_from_the_score_but_gamma_and_the_gates_do():
    rq, slots = RelationQuery(12), RelationSlots(D, A)
    emb, boxes, obj = _scene()
    logits = torch.randn(4, len(RELATIONS) + 1, requires_grad=True)
    anchor = torch.randn(4, A, requires_grad=True)
    emb.requires_grad_(True)

    def score():
        out, _ = slots(emb, boxes, obj)
        return (out[0] * rq.slots(logits, anchor)).sum()

    score().backward()
    assert all(float(t.grad.abs().sum()) > 0 for t in (logits, anchor, emb))
    for t in (logits, anchor, emb, rq.gamma, slots.threshold):
        t.grad = None
    rq.supervised = slots.supervised = True  # exact labels teach p and the codes: the score must not
    score().backward()
    assert all(t.grad is None or float(t.grad.abs().sum()) == 0.0 for t in (logits, anchor, emb))
    assert rq.gamma.grad is not None and float(slots.threshold.grad.abs().sum()) > 0
    _, codes = slots(emb, boxes, obj)  # ... while the codes the anchor term reads keep their gradient
    codes.sum().backward()
    assert float(emb.grad.abs().sum()) > 0


def test_anchor_codes_start_as_a_projection_that_keeps_dot_products():
    """At init <code(q), code(o)> ~ <q, o>: the anchor term starts from the REC space."""
    torch.manual_seed(0)
    code = AnchorCode(128, 64)
    q = torch.randn(2000, 128)
    o = q + 0.5 * torch.randn(2000, 128)  # pairs that agree, as a phrase and its instance do
    with torch.no_grad():
        got, want = (code(q) * code(o)).sum(-1), (q * o).sum(-1)
    assert 0.9 < float(got.mean() / want.mean()) < 1.1  # unbiased
    assert float(torch.corrcoef(torch.stack([got, want]))[0, 1]) > 0.45  # 64 of 128 dims: ~0.57


def test_relation_targets_and_loss_terms():
    objs = [
        SceneObject("circle", "red", "small", "solid", (0, 0, 10, 10)),
        SceneObject("star", "blue", "large", "solid", (50, 0, 80, 30)),
        SceneObject("star", "blue", "small", "outlined", (0, 50, 10, 60)),
    ]
    rel = {"target": {"shape": "circle"}, "relation": {"type": "left_of", "anchor": {"color": "blue", "shape": "star"}}}
    plain = {"target": {"color": "red"}}
    anchors, types = relation_targets([(rel, objs), (plain, objs), (None, objs)])
    assert anchors == [[1, 2], [], []]
    assert types == [RELATIONS.index("left_of"), NO_RELATION, UNKNOWN]

    # Anchor term: zero for codes that already say 'fits' (1) / 'does not fit' (0), positive else.
    owner = torch.eye(3)[None]  # query q stands for object q
    anchor = torch.tensor([[1.0, 0.0]])
    good = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    assert float(anchor_loss(anchor, good, owner, [[1, 2]])) == 0.0
    bad = good.clone().requires_grad_(True)
    loss = anchor_loss(anchor, bad, owner, [[1]])  # object 2 does not fit this anchor
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()
    assert float(bad.grad[0, 2, 0]) > 0  # descent lowers <a_t, a(2)>

    logits = torch.tensor([[5.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5.0], [0, 0, 0, 0, 0, 0]], requires_grad=True)
    ce = relation_type_loss(logits, types)  # the third text (no logical form) is not counted
    want = torch.nn.functional.cross_entropy(logits[:2].detach(), torch.tensor([0, 5]))
    assert float(ce.detach()) == pytest.approx(float(want))
    assert float(relation_type_loss(logits, [UNKNOWN] * 3)) == 0.0


def _model():
    from reir.training.config import load_config
    from reir.training.model import build_model

    cfg = load_config(TINY, {"model.anchor_dim": A})
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg


def test_score_is_own_term_plus_anchor_matches_on_the_asked_side():
    model, cfg = _model()
    d = cfg.model.d_model
    assert model.embed_dim == d + len(RELATIONS) * A
    ids = torch.tensor([[101, 2417, 4418, 2187, 1997, 1037, 2630, 2732, 102]])  # any ids: the tower is random
    mask = torch.ones_like(ids)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = model.encode_image(x)
        emb, codes = out["embeddings"][-1], out["anchor_codes"][-1]
        sentence = model.encode_sentence(ids, mask)
        q = model.encode_text(ids, mask)
        logits, anchors = model.relation_parts(sentence)
        p = torch.softmax(logits, -1)[0, : len(RELATIONS)]
        own = model.text_proj[-1](sentence[:, : model.text.dim])
        slots = model.relation_slots[-1]
        gates = slots.gates(out["boxes"][-1]) * torch.sigmoid(out["objectness"][-1])[:, None, :, None]
        gates = gates * (1 - torch.eye(emb.shape[1]))[None, :, :, None]
        match = torch.einsum("a,bja->bj", anchors[-1][0], codes)  # <a_t, a(j)>
        want = emb[..., :d] @ own[0] + model.relation_query.gamma * torch.einsum("r,bijr,bj->bi", p, gates, match)
    torch.testing.assert_close(emb @ q[0], want, atol=1e-4, rtol=1e-4)
    # A stage that leaves the relations out trains as if the model had none: d-dim vectors.
    model.train_relations(False, supervised=False)
    with torch.no_grad():
        assert model.queries(sentence)[-1].shape[-1] == d
        assert model.encode_image(x)["embeddings"][-1].shape[-1] == d


def test_relation_slots_export_to_onnx_with_the_same_numbers(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from reir.export.graphs import export_text, export_visual
    from reir.training.postprocess import Detector

    model, _ = _model()
    export_text(model, tmp_path / "text.onnx")
    export_visual(model, tmp_path / "visual.onnx", (128, 128), topk=10, nms_iou=0.7)
    ids = np.array([[101, 2417, 4418, 2187, 1997, 102, 0], [101, 2630, 2732, 2682, 1037, 2417, 102]], np.int64)
    mask = (ids != 0).astype(np.int64)
    text = ort.InferenceSession(str(tmp_path / "text.onnx"), providers=["CPUExecutionProvider"])
    got = text.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    images = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    visual = ort.InferenceSession(str(tmp_path / "visual.onnx"), providers=["CPUExecutionProvider"])
    got_emb = visual.run(["embeddings"], {"images": images})[0]
    with torch.no_grad():
        want_emb = Detector(model, 10, 0.7).eval()(torch.from_numpy(images))[2].numpy()
    assert got_emb.shape[-1] == model.embed_dim
    np.testing.assert_allclose(got_emb, want_emb, atol=1e-4, rtol=1e-3)


def test_a_stage_without_relations_freezes_the_slots():
    model, _ = _model()
    model.train_relations(False, supervised=False)
    assert not any(p.requires_grad for m in (model.relation_slots, model.relation_query) for p in m.parameters())
    model.train_relations(True, supervised=True)
    assert all(p.requires_grad for p in model.relation_slots.parameters())
    assert model.relation_query.supervised and model.relation_slots[0].supervised
    assert model.encode_image(torch.rand(1, 3, 128, 128))["anchor_codes"][-1].requires_grad
