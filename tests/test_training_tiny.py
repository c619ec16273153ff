"""End to end on CPU: the synth_tiny recipe trains, its loss falls, and it grounds
expressions far better than picking a random candidate, on a freshly generated set."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

from conftest import TINY_CONFIG as CONFIG  # noqa: E402

from reir.datasets.synth import SynthConfig, generate  # noqa: E402
from reir.evaluation import pairwise_iou  # noqa: E402


def test_loss_falls_and_checkpoint_is_complete(tiny_run):
    cfg, trainer, final = tiny_run
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    grounding = [r["total"] for r in rows if r["stage"] == cfg.train.stages[0].name]
    assert np.mean(grounding[-3:]) < 0.6 * np.mean(grounding[:3])
    assert any(r["stage"] == "clia" and r["clia"] > 0 for r in rows)  # stage 2 really ran CLIA
    from reir.training.checkpoint import load_checkpoint

    saved_cfg, state = load_checkpoint(final)
    assert saved_cfg == cfg and state["categories"] == trainer.train_set.categories
    # the end of stage 1 is kept beside it, for the stage-1-only ablation
    _, stage1 = load_checkpoint(trainer.run_dir / f"{cfg.train.stages[0].name}.pt")
    assert stage1["stage"] == 1 and "optimizer" not in stage1
    assert any(not torch.equal(stage1["model"][k], state["model"][k]) for k in state["model"])


def test_rec_beats_random_candidates_on_fresh_data(tiny_run, tmp_path):
    from reir.evaluation.protocol import encode_gallery
    from reir.training.evaluate import torch_detector, torch_text_encoder

    cfg, trainer, _ = tiny_run
    fresh, _ = generate(tmp_path / "fresh", SynthConfig(images=150, seed=1234, fractions=(0, 0, 1)), progress=False)
    exprs = sorted(fresh.split_expressions("test"), key=lambda e: e.id)
    ids = sorted({fresh.instances[e.instance_id].image_id for e in exprs})
    size = cfg.model.image_size
    found, problems = encode_gallery(
        torch_detector(trainer.model, cfg.eval), [fresh.image_path(i) for i in ids], (size, size), progress=False
    )
    assert not problems and all(d is not None for d in found)
    dets = dict(zip(ids, found, strict=True))
    queries = torch_text_encoder(trainer.model, trainer.tokenizer)([e.text for e in exprs])
    hit, chance = [], []
    for e, q in zip(exprs, queries, strict=True):
        d = dets[fresh.instances[e.instance_id].image_id]
        gt = np.asarray(fresh.instances[e.instance_id].box)[None]
        best = d.boxes[int(np.argmax(d.embeddings @ q))]
        hit.append(pairwise_iou(best[None], gt)[0, 0] >= 0.5)
        chance.append(float((pairwise_iou(d.boxes, gt)[:, 0] >= 0.5).mean()))
    rec, base = float(np.mean(hit)), float(np.mean(chance))
    print(f"REC@0.5 {rec:.3f} vs random candidate {base:.3f} over {len(exprs)} fresh expressions")
    assert rec >= max(2.5 * base, base + 0.12)


def test_resume_continues_the_same_schedule(tiny_run, tmp_path):
    from reir.training.checkpoint import load_checkpoint
    from reir.training.config import load_config
    from reir.training.trainer import Trainer

    cfg, _, _ = tiny_run
    stages = [{"name": "a", "steps": 4, "warmup": 1}, {"name": "b", "steps": 2, "warmup": 1, "clia": True}]
    over = {"out_dir": str(tmp_path), "data.root": cfg.data.root, "train.stages": stages, "train.ckpt_every": 2}
    first = Trainer(load_config(CONFIG, {**over, "train.stages": stages[:1]}), progress=False)
    first.fit()
    _, state = load_checkpoint(first.run_dir / "last.pt")
    assert state["stage"] == 1 and state["step"] == 0  # stage a complete
    resumed = Trainer(load_config(CONFIG, over), progress=False)
    resumed.fit(resume=True)
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows].count("a") == 1 and rows[-1]["stage"] == "b"  # a not re-run
    changed = load_config(CONFIG, {**over, "model.d_model": 32})
    from reir.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.d_model: 64 vs 32"):
        Trainer(changed, progress=False).fit(resume=True)


def test_start_from_a_stage_checkpoint_runs_only_the_later_stages(tiny_run, tmp_path):
    """`--start-from runs/x/grounding.pt`: stage-2 variants share one stage 1."""
    from reir.training.checkpoint import CheckpointError
    from reir.training.config import load_config
    from reir.training.trainer import Trainer

    cfg, trainer, _ = tiny_run
    stages = [{"name": "grounding", "steps": 320}, {"name": "clia", "steps": 2, "warmup": 1, "clia": True}]
    over = {"out_dir": str(tmp_path), "data.root": cfg.data.root, "train.stages": stages, "train.ckpt_every": 1}
    t = Trainer(load_config(CONFIG, over), progress=False)
    t.fit(start_from=trainer.run_dir / "grounding.pt")
    rows = [json.loads(line) for line in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and {r["stage"] for r in rows} == {"clia"}
    from reir.training.checkpoint import load_checkpoint, save_checkpoint

    saved_cfg, state = load_checkpoint(trainer.run_dir / "grounding.pt")
    extra = {k: state[k] for k in ("criterion", "epoch", "categories")}
    save_checkpoint(tmp_path / "mid.pt", saved_cfg, trainer.model, {**extra, "stage": 0, "step": 5})
    with pytest.raises(CheckpointError, match="middle of a stage"):
        Trainer(load_config(CONFIG, over), progress=False).fit(start_from=tmp_path / "mid.pt")


def test_same_seed_gives_the_same_weights_while_another_run_shares_the_cores(tiny_run, tmp_path):
    """`train.deterministic` (on in synth_tiny): two runs of the recipe at once on two cores,
    each slowed by the other, end with bit-identical weights. Without it, oneDNN's threaded
    convolution backward gave running statistics 0.01 apart on this machine."""
    import subprocess
    import sys

    from reir.training.checkpoint import load_checkpoint

    cfg, _, _ = tiny_run
    runs = []
    for name in ("a", "b"):
        sets = {
            "out_dir": tmp_path / name,
            "data.root": cfg.data.root,  # the fixture's generated data: no second generation
            "train.stages.0.steps": 12,
            "train.stages.1.steps": 4,
            "train.stages.1.warmup": 1,
        }
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        cmd = [sys.executable, "-m", "reir.cli", "train", str(CONFIG), *args, "--quiet"]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for run in runs:
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out[-2000:]
    a, b = (load_checkpoint(tmp_path / n / cfg.name / "final.pt")[1]["model"] for n in ("a", "b"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
