"""Hand-computed checks of the REIR metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from reir.datasets.dataset import Dataset, Expression, Image, Instance
from reir.evaluation import (
    GalleryArrays,
    Hits,
    Report,
    box_recall,
    evaluate,
    image_recall,
    outcome,
    rank_gallery,
    rec_accuracy,
    tir_recall,
)

BOX = (0.0, 0.0, 10.0, 10.0)
HALF = (0.0, 0.0, 10.0, 5.0)  # IoU 0.5 with BOX
OFF = (50.0, 50.0, 60.0, 60.0)  # IoU 0


def hits(rows):
    """rows: (image_id, box, score), already in ranked order."""
    if not rows:
        return Hits(np.zeros(0), np.zeros((0, 4)), np.zeros(0))
    ids, boxes, scores = zip(*rows, strict=True)
    return Hits(np.array(ids), np.array(boxes), np.array(scores))


def test_first_gt_instance_decides_and_only_its_box_counts():
    # GT image 7; its best instance ranks 2nd (pos 1) with a wrong box; a correct box of the
    # same image ranks lower and must not rescue the query.
    h = hits([(3, BOX, 0.9), (7, OFF, 0.8), (7, BOX, 0.7), (4, BOX, 0.1)])
    o = outcome(h, {7: np.array([BOX])})
    assert (o.pos, o.image_rank, o.iou) == (1, 1, 0.0)
    assert box_recall([o], 5, 0.5) == 0.0
    assert image_recall([o], 1) == 0.0 and image_recall([o], 2) == 100.0


def test_instance_level_rank_counts_every_instance_of_a_distractor():
    # Two instances of image 3 ahead: instance rank 2, image rank 1.
    h = hits([(3, OFF, 0.9), (3, OFF, 0.8), (7, BOX, 0.7)])
    o = outcome(h, {7: np.array([BOX])})
    assert (o.pos, o.image_rank, o.iou) == (2, 1, 1.0)
    assert box_recall([o], 2, 0.5) == 0.0
    assert box_recall([o], 3, 0.5) == 100.0
    assert box_recall([o], 2, 0.5, dedup=True) == 100.0  # image-deduplicated variant


def test_iou_threshold_is_inclusive():
    o = outcome(hits([(7, HALF, 1.0)]), {7: np.array([BOX])})
    assert o.iou == pytest.approx(0.5)
    assert box_recall([o], 1, 0.5) == 100.0
    assert box_recall([o], 1, 0.7) == 0.0


def test_ties_count_against_the_query():
    # Distractor tied with the GT instance and listed after it: still ranked ahead.
    h = hits([(7, BOX, 0.5), (3, OFF, 0.5), (4, OFF, 0.2)])
    o = outcome(h, {7: np.array([BOX])})
    assert o.pos == 1 and o.image_rank == 1
    assert box_recall([o], 1, 0.5) == 0.0
    # A constant-score model gets nothing, whatever the gallery order.
    const = hits([(7, BOX, 0.0), (3, OFF, 0.0), (4, OFF, 0.0)])
    assert box_recall([outcome(const, {7: np.array([BOX])})], 1, 0.5) == 0.0


def test_gt_image_without_candidates_and_empty_gallery_are_misses():
    o = outcome(hits([(3, BOX, 1.0), (4, BOX, 0.5)]), {7: np.array([BOX])})
    assert math.isinf(o.pos) and o.iou == 0.0
    assert box_recall([o], 10, 0.5) == 0.0
    assert math.isinf(outcome(hits([]), {7: np.array([BOX])}).pos)
    assert box_recall([], 1, 0.5) == 0.0 and image_recall([], 1) == 0.0


def test_k_larger_than_gallery():
    h = hits([(3, OFF, 0.9), (7, BOX, 0.1)])
    assert box_recall([outcome(h, {7: np.array([BOX])})], 100, 0.5) == 100.0
    g = GalleryArrays(np.eye(2, dtype=np.float32), np.array([3, 7]), np.array([OFF, BOX]))
    (ranked,) = rank_gallery(np.array([[0.0, 1.0]]), g, k=50)
    assert list(ranked.image_ids) == [7, 3]


def test_multi_positive_uses_any_answer_image():
    h = hits([(5, BOX, 0.9), (7, BOX, 0.8)])
    assert outcome(h, {7: np.array([BOX])}).pos == 1  # official: source image only
    multi = outcome(h, {7: np.array([BOX]), 5: np.array([OFF, BOX])})
    assert multi.pos == 0 and multi.iou == 1.0  # IoU against the best answer box of that image


def test_rank_gallery_is_exact_dot_product_with_stable_ties():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    emb[10] = emb[20]  # a tie
    g = GalleryArrays(emb, np.arange(50), np.tile(BOX, (50, 1)))
    q = rng.normal(size=(3, 8)).astype(np.float32)
    q[0] = emb[10]
    for row, h in zip(q, rank_gallery(q, g, k=50), strict=True):
        want = np.lexsort((np.arange(50), -(emb @ row)))
        assert list(h.image_ids) == list(want)
        assert np.all(np.diff(h.scores) <= 0)


def test_rec_accuracy_and_tir_recall():
    assert rec_accuracy(np.array([BOX, OFF, HALF]), np.array([BOX, BOX, BOX]), 0.5) == pytest.approx(200 / 3)
    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, 0.3]])
    assert tir_recall(scores, [{0}, {1}], 1) == 50.0  # query 2: image 1 ties image 0, loses
    assert tir_recall(scores, [{0}, {1}], 3) == 100.0
    assert tir_recall(scores, [{1, 2}, set()], 2) == 50.0  # max over GT images (0.5 ranks 2nd); no GT = miss
    assert tir_recall(np.zeros((0, 0)), [], 1) == 0.0


def _tiny_dataset() -> Dataset:
    ds = Dataset(root=None, image_root=None)  # type: ignore[arg-type]
    for i in (1, 2, 3):
        ds.images[i] = Image(i, f"{i}.png", 100, 100, "test")
    ds.instances = {
        10: Instance(10, 1, BOX, "circle"),
        11: Instance(11, 1, OFF, "star"),
        20: Instance(20, 2, BOX, "circle"),
        30: Instance(30, 3, BOX, "circle"),
    }
    ds.expressions = {
        1: Expression(1, "the circle", 10, "test", "attribute", answers=(10, 20, 30)),
        2: Expression(2, "the star", 11, "test", "attribute", answers=(11,)),
    }
    return ds


def test_evaluate_report_breakdowns_and_json_roundtrip():
    ds = _tiny_dataset()
    preds = {
        1: hits([(2, BOX, 0.9), (1, BOX, 0.5)]),  # official pos 1; multi pos 0
        # expression 2 missing: counts as a miss
    }
    rep = evaluate(preds, ds, "test", rec_boxes={1: np.array(BOX), 2: np.array(BOX)})
    assert rep.n_queries == 2
    assert rep.metrics["BR@1(0.5)"] == 0.0
    assert rep.metrics["BR@5(0.5)"] == 50.0
    assert rep.metrics["mBR@1(0.5)"] == 50.0
    assert rep.metrics["REC@0.5"] == 50.0
    assert rep.groups["true_in=1"]["n"] == 1 and rep.groups["true_in=2-3"]["n"] == 1
    assert rep.groups["true_in=2-3"]["mBR@1(0.5)"] == 100.0
    again = Report.from_dict(__import__("json").loads(rep.to_json()))
    assert again.metrics == rep.metrics and again.groups == rep.groups
    assert "BR (multi-positive)" in rep.table()


def test_top1_failures_name_the_kind_of_miss(synth_small):
    """One query of each kind, built from a generated synthetic split, then the report."""
    from reir.datasets import load_dataset

    ds = load_dataset(synth_small)
    exprs = sorted(ds.split_expressions("test"), key=lambda e: e.id)
    by_image: dict[int, list] = {}
    for inst in ds.instances.values():
        by_image.setdefault(inst.image_id, []).append(inst)
    test_images = {ds.instances[e.instance_id].image_id for e in exprs}

    def fits(inst, desc) -> bool:
        return all(inst.attributes.get(k) == v for k, v in desc.items())

    def kind_of(e, inst) -> str:  # what the classifier should say for an instance as top-1
        if inst.id in (e.answers or ()):
            return "hit"
        anchor = (e.logic.get("relation") or {}).get("anchor")
        if fits(inst, e.logic["target"]):
            others = [i for i in by_image[inst.image_id] if i.id != inst.id]
            return "no anchor" if anchor and not any(fits(i, anchor) for i in others) else "wrong context"
        return "the anchor" if anchor and fits(inst, anchor) else "wrong attributes"

    wanted = dict.fromkeys(["hit", "the anchor", "wrong attributes", "no anchor", "wrong context"])
    for e in exprs:
        for image in sorted(test_images):
            for inst in by_image[image]:
                k = kind_of(e, inst)
                if wanted[k] is None and all(w is None or w[0].id != e.id for w in wanted.values()):
                    wanted[k] = (e, inst)
    assert all(v is not None for v in wanted.values()), wanted
    preds = {e.id: hits([(inst.image_id, inst.box, 0.9)]) for e, inst in wanted.values()}
    # one more query: its top-1 box is a 1-pixel corner of a test image, background
    e4 = next(e for e in exprs if e.id not in preds)
    preds[e4.id] = hits([(min(test_images), (0.0, 0.0, 1.0, 1.0), 0.9)])

    rep = evaluate(preds, ds, "test")
    f = rep.failures
    n = len(exprs)
    assert f["all"]["n"] == n
    assert f["all"]["misses"] == n - 1  # only the one hit; queries without hits are misses too
    assert round(rep.metrics["mBR@1(0.5)"] * n / 100) == 1
    for kind in ("no instance", "the anchor", "wrong attributes", "no anchor", "wrong context"):
        assert f["all"][kind] == pytest.approx(100.0 / (n - 1)), kind
    assert "Top-1 misses" in rep.table() and "wrong context" in rep.table()
    assert Report.from_dict(__import__("json").loads(rep.to_json())).failures == f


def test_attribute_probe_finds_what_embeddings_encode(synth_small):
    """Embeddings that encode colour (one-hot + noise) and nothing else: colour is read back,
    shape stays near chance, and a detection off every instance is not counted."""
    from reir.datasets import load_dataset
    from reir.engine.runtime.detections import Detections
    from reir.evaluation.probe import attribute_probe

    ds = load_dataset(synth_small)
    by_image = ds.instances_by_image()
    colours = sorted({i.attributes["color"] for i in ds.instances.values()})
    rng = np.random.default_rng(0)
    dets, n = {}, 0
    for image, insts in by_image.items():
        boxes = [i.box for i in insts] + [(0.0, 0.0, 1.0, 1.0)]  # + one box on background
        emb = rng.normal(0, 0.3, (len(boxes), len(colours) + 8))
        for j, inst in enumerate(insts):
            emb[j, colours.index(inst.attributes["color"])] += 3.0
        dets[image] = Detections(np.asarray(boxes, np.float64), np.ones(len(boxes)), emb)
        n += len(insts)
    probe = attribute_probe(dets, by_image)
    assert probe["color"]["accuracy"] > 95 and probe["color"]["chance"] == pytest.approx(100 / len(colours))
    assert probe["shape"]["accuracy"] < probe["shape"]["chance"] + 20
    assert probe["color"]["n"] == n - n // 2
