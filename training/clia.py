"""CLIA: contrastive language-instance alignment (docs/model.md).

Sigmoid pairwise loss between every local query (B images x M queries) and every
text of the *global* batch (G ranks x B texts):

    l_{(i,j),k} = exp(t) <o_ij, T_k> + b,    L = -1/(G B) sum log sigmoid(y * l)

y = +1 where query j of image i is matched to an instance that text k is true of,
else -1. The paper's labels make only (own text, matched target) positive; with exact
answer sets (the synthetic benchmark) candidates in other images that satisfy text k
are positives too (`positives`), since labelling them negative contradicts the data.
Texts are all-gathered with gradient across ranks; objects stay local.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (ranks may hold different numbers of rows) whose backward hands
    each rank the gradient of the *sum of all ranks' losses* with respect to its own rows
    (all-reduce of the full gradient, then this rank's slice)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        world = dist.get_world_size()
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop], None


def comm_device() -> torch.device:
    """Where a collective's buffers must live: NCCL takes GPU tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """All ranks' rows of x, differentiable; and where this rank's rows start."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    device = comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=device))
    sizes = [int(c) for c in counts]  # rows per rank, gathered once for both uses
    return _AllGather.apply(x, sizes), sum(sizes[: dist.get_rank()])


class CLIALoss(nn.Module):
    """One per decoder layer: its own temperature t (init log 10) and bias b (init 0)."""

    def __init__(self, init_scale: float = 10.0, init_bias: float = 0.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.bias = nn.Parameter(torch.tensor(init_bias))

    def forward(self, objects: Tensor, texts: Tensor, labels: Tensor, listwise: float = 0.0) -> Tensor:
        """objects [B, M, D] (local), texts [G*B, D] (global, already gathered),
        labels [B, M, G*B] in {0, 1}. `listwise` > 0 adds that weight of `listwise_loss`."""
        logits = self.logit_scale.exp() * torch.einsum("bmd,kd->bmk", objects, texts) + self.bias
        logits = logits.clamp(-50000, 50000)
        y = labels.to(logits.dtype) * 2 - 1
        loss = -F.logsigmoid(y * logits).sum() / texts.shape[0]
        if listwise > 0:
            loss = loss + listwise * listwise_loss(logits, labels)
        return loss


def listwise_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per text, -log of the softmax mass its positives take among all of this rank's
    queries, averaged over the texts with a positive here. The sigmoid loss judges each pair
    against a fixed threshold; retrieval asks that a positive outrank every other candidate
    of every image, which is what a softmax over candidates rewards (multi-positive: any
    positive may take the mass). logits, labels [B, M, K]."""
    flat = logits.flatten(0, 1).T  # [K, B*M]
    pos = labels.flatten(0, 1).T > 0
    has = pos.any(1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    flat, pos = flat[has], pos[has]
    mass = torch.logsumexp(flat.masked_fill(~pos, float("-inf")), 1)
    return (torch.logsumexp(flat, 1) - mass).mean()


def positive_matrix(positives: list[list[list[int]]], num_objects: int, num_texts: int, device=None) -> Tensor:
    """[B, N, K] in {0, 1}: object n of local image i is one text k (global index) is true of.
    Built once per step on the host, then moved in one copy: per-(image, text) tensor ops
    would launch thousands of kernels per step on a GPU."""
    pos = np.zeros((len(positives), num_objects, num_texts), np.float32)
    for i, per_text in enumerate(positives):
        for k, objs in enumerate(per_text):
            pos[i, objs, k] = 1.0
    return torch.from_numpy(pos).to(device)


def clia_labels(owners: Tensor, positives: Tensor) -> Tensor:
    """labels[i, j, k] = 1 iff query j of local image i stands for (owners [B, Q, N]) an object
    of image i that text k is true of (positives [B, N, K], `positive_matrix`)."""
    return (torch.bmm(owners, positives) > 0).to(owners.dtype)
