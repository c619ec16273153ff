"""Weight averages over a stage (`ema`, `ema_compare`): the arithmetic, what the trainer
saves and starts the next stage from, and resuming in the middle of an averaged stage."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from conftest import TINY_CONFIG as CONFIG  # noqa: E402


def _toy() -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
    m[2].weight.requires_grad_(False)  # a frozen layer
    m.register_buffer("position_ids", torch.arange(5))  # an integer buffer, as in BERT
    return m


def test_average_follows_the_ema_recursion_and_leaves_frozen_and_integer_tensors_alone():
    from reir.training.ema import WeightAverage

    m = _toy()
    avg = WeightAverage(m, 0.75)
    assert "2.weight" not in avg.tensors and "position_ids" not in avg.tensors
    assert {"0.weight", "0.bias", "1.running_mean", "1.running_var"} <= set(avg.tensors)
    expected = m[0].weight.detach().clone()
    for i in range(3):
        with torch.no_grad():
            m[0].weight.add_(float(i + 1))
        m.train()(torch.randn(8, 3))  # moves the BatchNorm statistics
        avg.update(m)
        expected = 0.75 * expected + 0.25 * m[0].weight.detach()
    state = avg.averaged_state(m)
    torch.testing.assert_close(state["0.weight"], expected)
    assert not torch.equal(state["0.weight"], m[0].weight)
    assert not torch.equal(state["1.running_mean"], m[1].running_mean)
    assert torch.equal(state["2.weight"], m[2].weight) and torch.equal(state["position_ids"], torch.arange(5))
    with pytest.raises(ValueError, match=r"decay 0\.5"):
        WeightAverage(m, 0.75).load_state_dict({**avg.state_dict(), "decay": 0.5})
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WeightAverage(m, 1.0)


def _run(tiny_run, tmp_path, ema: float, compare: list[float]):
    from reir.training.config import load_config
    from reir.training.trainer import Trainer

    cfg, _, _ = tiny_run
    stages = [
        {"name": "a", "steps": 3, "warmup": 1},
        {"name": "b", "steps": 4, "warmup": 1, "clia": True, "ema": ema, "ema_compare": compare},
    ]
    over = {"out_dir": str(tmp_path), "data.root": cfg.data.root, "train.stages": stages, "train.ckpt_every": 2}
    t = Trainer(load_config(CONFIG, over), progress=False)
    return t, t.fit()


def test_the_stage_ends_with_its_average_and_saves_the_raw_weights_and_the_compared_ones(tiny_run, tmp_path):
    """Decay near 1 keeps the stage's start (a.pt); decay near 0 is the last step (b.raw.pt)."""
    from reir.training.checkpoint import load_checkpoint

    t, final = _run(tiny_run, tmp_path, ema=0.999999, compare=[1e-9])
    weights = {p: load_checkpoint(t.run_dir / p)[1]["model"] for p in ("a.pt", "b.raw.pt", "b.ema1e-09.pt")}
    start, raw, last = weights["a.pt"], weights["b.raw.pt"], weights["b.ema1e-09.pt"]
    _, state = load_checkpoint(final)
    trained = [n for n, p in t.model.named_parameters() if p.requires_grad]
    moved = [n for n in trained if not torch.allclose(start[n], raw[n], atol=1e-5)]
    assert len(moved) > 0.5 * len(trained)  # stage b really trained
    for n in moved:
        torch.testing.assert_close(state["model"][n], start[n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[n], raw[n])
    assert state["stage"] == 2  # final.pt is the averaged model, and so is what the run holds now
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in state["model"].items())


def test_resume_in_the_middle_of_an_averaged_stage_continues_its_averages(tiny_run, tmp_path):
    from reir.training.checkpoint import CheckpointError, load_checkpoint

    t, _ = _run(tiny_run, tmp_path, ema=0.9, compare=[0.5])
    stage = t.cfg.train.stages[1]
    averages = t.begin_averages(stage, None, None)
    for _ in range(2):
        with torch.no_grad():
            for p in t.model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        for avg in averages:
            avg.update(t.model)
    path = tmp_path / "mid.pt"
    t.save(path, 1, 2, 0, None, averages)
    _, state = load_checkpoint(path)
    resumed = t.begin_averages(stage, state, path)
    for a, b in zip(averages, resumed, strict=True):
        assert a.decay == b.decay and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    t.save(path, 1, 2, 0, None)  # a mid-stage checkpoint without them
    _, state = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="without the weight averages stage 'b' keeps"):
        t.begin_averages(stage, state, path)


def test_a_decay_outside_the_open_unit_interval_fails_at_start():
    from reir.training.config import ConfigError, load_config

    stage = {"name": "b", "steps": 4, "ema": 0.9, "ema_compare": [1.5]}
    with pytest.raises(ConfigError, match=r"stage 'b': an EMA decay must be in \(0, 1\), got 1.5"):
        load_config(CONFIG, {"train.stages": [stage]})
