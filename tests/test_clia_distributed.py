"""CLIA under torch.distributed (2 gloo ranks on CPU) equals one process over the same global batch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.train  # two processes train a step; torchrun trains the tiny recipe

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from reir.training.clia import CLIALoss, gather_with_grad  # noqa: E402

G, B, M, D = 2, 3, 5, 8
TEXTS = (3, 2)  # texts per rank differ (composed expressions make them differ in training)


def global_batch():
    g = torch.Generator().manual_seed(0)
    objects = torch.randn(G * B, M, D, generator=g)
    texts = torch.randn(sum(TEXTS), D, generator=g)
    labels = (torch.rand(G * B, M, sum(TEXTS), generator=g) < 0.2).float()
    return objects, texts, labels


def single_process():
    objects, texts, labels = global_batch()
    objects.requires_grad_(True)
    texts.requires_grad_(True)
    loss_fn = CLIALoss(10.0, -3.0)
    loss = loss_fn(objects, texts, labels)
    loss.backward()
    return loss.detach(), objects.grad, texts.grad, loss_fn.logit_scale.grad, loss_fn.bias.grad


def _rank(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=G)
    objects, texts, labels = global_batch()
    mine = slice(rank * B, (rank + 1) * B)
    own = slice(sum(TEXTS[:rank]), sum(TEXTS[: rank + 1]))
    obj = objects[mine].clone().requires_grad_(True)
    txt = texts[own].clone().requires_grad_(True)
    all_texts, offset = gather_with_grad(txt)
    assert offset == own.start
    torch.testing.assert_close(all_texts, texts)
    loss_fn = CLIALoss(10.0, -3.0)
    loss = loss_fn(obj, all_texts, labels[mine])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = torch.stack([loss_fn.logit_scale.grad, loss_fn.bias.grad])
    dist.all_reduce(grads)
    out[rank] = (total, obj.grad, txt.grad, grads)
    dist.destroy_process_group()


def test_two_ranks_equal_single_process(tmp_path):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=G, join=True)
        results = dict(out)
    loss, g_obj, g_txt, g_scale, g_bias = single_process()
    for rank in range(G):
        total, obj_grad, txt_grad, param_grads = results[rank]
        mine = slice(rank * B, (rank + 1) * B)
        own = slice(sum(TEXTS[:rank]), sum(TEXTS[: rank + 1]))
        torch.testing.assert_close(total, loss)
        torch.testing.assert_close(obj_grad, g_obj[mine])
        # The text gradient flows back through the all-gather from every rank's loss.
        torch.testing.assert_close(txt_grad, g_txt[own])
        torch.testing.assert_close(param_grads, torch.stack([g_scale, g_bias]))
    assert g_txt.abs().sum() > 0 and g_obj.abs().sum() > 0


def test_torchrun_two_ranks_train_the_tiny_recipe(tmp_path, synth_small):
    """`torchrun --nproc_per_node 2 -m reir.cli train ...` runs on CPU (gloo) end to end."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "synth_tiny.yaml"
    stages = json.dumps([{"name": "g", "steps": 3, "warmup": 1}, {"name": "c", "steps": 2, "warmup": 1, "clia": True}])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "reir.cli", "train", str(config), "--quiet",
        "--set", f"out_dir={tmp_path}", "--set", f"data.root={synth_small}", "--set", f"train.stages={stages}",
        "--set", "train.log_every=1",
    ]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "synth_tiny"
    assert (run / "final.pt").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["g"] * 3 + ["c"] * 2  # rank 0 alone writes
