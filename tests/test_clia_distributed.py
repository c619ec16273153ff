"""CLIA under torch.distributed (2 gloo ranks on CPU) equals one process over the same global batch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch not installed (training extra)")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from reir.training.clia import CLIALoss, gather_with_grad  # noqa: E402

G, B, M, D = 2, 3, 5, 8


def global_batch():
    g = torch.Generator().manual_seed(0)
    objects = torch.randn(G * B, M, D, generator=g)
    texts = torch.randn(G * B, D, generator=g)
    labels = (torch.rand(G * B, M, G * B, generator=g) < 0.2).float()
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
    obj = objects[mine].clone().requires_grad_(True)
    txt = texts[mine].clone().requires_grad_(True)
    all_texts, offset = gather_with_grad(txt)
    assert offset == rank * B
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
        torch.testing.assert_close(total, loss)
        torch.testing.assert_close(obj_grad, g_obj[mine])
        # The text gradient flows back through the all-gather from every rank's loss.
        torch.testing.assert_close(txt_grad, g_txt[mine])
        torch.testing.assert_close(param_grads, torch.stack([g_scale, g_bias]))
    assert g_txt.abs().sum() > 0 and g_obj.abs().sum() > 0
