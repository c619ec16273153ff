"""Neighbour naming (training/neighbours.py): exact labels, and a context head that learns
them through its neighbour term alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from conftest import TINY_CONFIG  # noqa: E402

from reir.datasets.synth.scene import COLORS, SHAPES, SceneObject  # noqa: E402
from reir.training.config import ConfigError, load_config  # noqa: E402
from reir.training.context import InstanceContext  # noqa: E402
from reir.training.neighbours import FACTS, VALUES, NeighbourReadout, asked_facts, scene_facts  # noqa: E402


def _obj(shape: str, color: str, x: int, y: int, side: int = 20) -> SceneObject:
    return SceneObject(shape=shape, color=color, size="small", fill="solid", box=(x, y, x + side, y + side))


def _facts_of(row: np.ndarray) -> set[tuple[str, str, str]]:
    return {FACTS[n] for n in np.flatnonzero(row)}


def test_scene_facts_follow_the_benchmark_semantics():
    # circle far left, red star far right, blue square above-right of the circle, touching it
    scene = [_obj("circle", "green", 10, 100), _obj("star", "red", 160, 100), _obj("square", "blue", 30, 80)]
    facts = scene_facts(scene, 200, 200)
    circle = _facts_of(facts[0])
    assert {("left_of", "shape", "star"), ("left_of", "color", "red")} <= circle
    assert ("right_of", "shape", "star") not in circle and ("next_to", "shape", "star") not in circle
    assert ("next_to", "color", "blue") in circle  # touching boxes
    # centres 20 px apart, exactly REL_GAP (10% of 200): the circle is below the square, not above
    assert ("below", "color", "blue") in circle and ("above", "color", "blue") not in circle
    star = _facts_of(facts[1])
    assert ("right_of", "shape", "circle") in star and ("right_of", "shape", "star") not in star  # not itself
    assert all(r != "next_to" for r, _, _ in star)


def test_asked_facts_are_the_relation_and_its_anchor_only():
    logic = {"target": {"shape": "circle"}, "relation": {"type": "below", "anchor": {"color": "red", "shape": "star"}}}
    assert _facts_of(asked_facts(logic)) == {("below", "color", "red"), ("below", "shape", "star")}
    assert asked_facts({"target": {"shape": "circle"}, "location": {"h": "left"}}) is None
    assert asked_facts(None) is None


def test_neighbour_weight_needs_the_context_heads():
    with pytest.raises(ConfigError, match="context_slots"):
        load_config(TINY_CONFIG, {"loss.neighbour_weight": 1.0, "model.context_slots": 0})


def _random_scene(rng: np.random.Generator, n: int) -> list[SceneObject]:
    out = []
    for _ in range(n):
        x, y = (int(v) for v in rng.integers(0, 170, 2))
        out.append(_obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))], x, y))
    return out


def _tensors(scenes: list[list[SceneObject]], d: int):
    hidden = torch.zeros(len(scenes), len(scenes[0]), d)
    boxes = torch.zeros(len(scenes), len(scenes[0]), 4)
    for b, scene in enumerate(scenes):
        for i, o in enumerate(scene):
            for a, v in ((a, v) for a, v in VALUES if o.attr(a) == v):
                hidden[b, i, VALUES.index((a, v))] = 1.0  # the state says what the object is
            x0, y0, x1, y1 = o.box
            boxes[b, i] = torch.tensor([(x0 + x1) / 400, (y0 + y1) / 400, (x1 - x0) / 200, (y1 - y0) / 200])
    facts = torch.from_numpy(np.stack([scene_facts(s, 200, 200) for s in scenes]))
    return hidden, boxes, facts


def test_the_context_head_learns_neighbour_facts_through_its_neighbour_term():
    """What the loss asks is learnable by the head it trains: after a short fit, held-out
    scenes' facts are read from the neighbour term far better than from their base rates."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    d = 32
    context, readout = InstanceContext(d, slots=8), NeighbourReadout(d)
    opt = torch.optim.Adam([*context.parameters(), *readout.parameters()], lr=3e-3)
    objectness = torch.full((16, 5), 6.0)
    none = torch.zeros(0, d), torch.zeros(0, len(FACTS))
    for _ in range(300):
        hidden, boxes, facts = _tensors([_random_scene(rng, 5) for _ in range(16)], d)
        near, _ = context.terms(hidden, boxes, objectness)
        loss = readout(near.flatten(0, 1), facts.flatten(0, 1), *none)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hidden, boxes, facts = _tensors([_random_scene(rng, 5) for _ in range(16)], d)
    with torch.no_grad():
        near, _ = context.terms(hidden, boxes, objectness)
        learned = float(readout(near.flatten(0, 1), facts.flatten(0, 1), *none))
    rate = facts.flatten(0, 1).mean(0).clamp(1e-3, 1 - 1e-3)
    base = float(torch.nn.functional.binary_cross_entropy(rate.expand_as(facts.flatten(0, 1)), facts.flatten(0, 1)))
    print(f"held-out BCE {learned:.3f} vs base rate {base:.3f}")
    assert learned < 0.6 * base


def test_fact_auc_ranks_per_fact():
    from reir.training.probes.neighbours import fact_auc

    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]] * 3, np.float32)
    assert fact_auc(y.copy(), y, min_each=2) == 1.0
    assert fact_auc(1 - y, y, min_each=2) == 0.0
    assert fact_auc(np.full_like(y, 0.3), y, min_each=2) == 0.5  # ties count half
    assert np.isnan(fact_auc(y, y, min_each=10))  # no fact has enough of both


def test_neighbour_probe_reads_a_checkpoint_and_refuses_one_without_the_readout(tmp_path):
    from reir.datasets.synth import SynthConfig, generate
    from reir.training.checkpoint import CheckpointError, save_checkpoint
    from reir.training.criterion import SetCriterion
    from reir.training.model import build_model
    from reir.training.probes.neighbours import probe

    generate(tmp_path / "data", SynthConfig(images=12, seed=3, fractions=(0, 0, 1)), progress=False)
    for weight in (1.0, 0.0):
        cfg = load_config(TINY_CONFIG, {"model.context_slots": 2, "loss.neighbour_weight": weight})
        torch.manual_seed(0)
        model = build_model(cfg.model)
        criterion = SetCriterion(cfg.loss, cfg.model.dec_layers, cfg.model.d_model)
        path = tmp_path / f"w{weight}.pt"
        save_checkpoint(path, cfg, model, {"criterion": criterion.state_dict()})
        if weight == 0.0:
            with pytest.raises(CheckpointError, match="trained without neighbour naming"):
                probe(path, tmp_path / "data", "test", 4)
            continue
        with pytest.raises(SystemExit, match="no test object"):  # untrained: no box reaches IoU 0.5
            probe(path, tmp_path / "data", "test", 4)
        found = probe(path, tmp_path / "data", "test", 4, min_iou=0.0)  # every object's best query
        assert found["objects"] > 0 and 0.0 <= found["visual AUC"] <= 1.0
        assert found["relation texts"] > 0 and 0.0 < found["text p(asked)"] < 1.0
