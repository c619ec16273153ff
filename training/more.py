"""MORE: Mix of Relation Experts (docs/model.md).

    shared = W_s x + b_s;  g = softmax(W_g x + b_g);  (v, idx) = topk(g, K)   (not renormalised)
    routed = sum_r v_r (W_idx_r x + b_idx_r);  T = (1 - w) shared + w routed

Routing is per expression; no auxiliary loss. All experts are evaluated and masked,
which is exact, cheap at these sizes and exports to ONNX without dynamic control flow.

Top-K routing is discontinuous: where the K-th and (K+1)-th gates nearly tie, any rounding
of the encoder (fp16, int8) may pick another expert. `routed` gives the export gates the
model's answer under each such choice, so they can tell a tie from drift.
"""

from __future__ import annotations

import itertools
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from .overrides import overriding


class MORE(nn.Module):
    def __init__(self, din: int, dout: int, experts: int = 4, top_k: int = 2, weight: float = 0.2):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"MORE: top_k must be in 1..experts, got {top_k} of {experts}")
        self.shared = nn.Linear(din, dout)
        self.router = nn.Linear(din, experts)
        self.experts = nn.Linear(din, experts * dout)  # E stacked Linear(din, dout)
        self.e, self.k, self.w, self.dout = experts, top_k, weight, dout
        self.route_override: tuple[tuple[int, ...], float] | None = None  # set by `routed` only

    def gates(self, x: Tensor) -> Tensor:
        """Softmax router weights with all but the top-K zeroed: [B, E]."""
        g = torch.softmax(self.router(x), -1)
        keep = g >= torch.topk(g, self.k, dim=-1).values[..., -1:]
        if self.route_override is not None:
            chosen, tie = self.route_override
            alt = torch.zeros_like(keep)
            alt[..., list(chosen)] = True
            weakest_in = torch.where(alt, g, torch.inf).amin(-1)
            strongest_out = torch.where(alt, -torch.inf, g).amax(-1)
            keep = torch.where((weakest_in >= strongest_out - tie)[..., None], alt, keep)
        return torch.where(keep, g, torch.zeros_like(g))

    def forward(self, x: Tensor) -> Tensor:
        routed = (self.gates(x)[..., None] * self.experts(x).view(*x.shape[:-1], self.e, self.dout)).sum(-2)
        return (1 - self.w) * self.shared(x) + self.w * routed


def tie_routings(model: nn.Module) -> list[tuple[int, ...]]:
    """Every choice of K experts of the model's MORE (none without one)."""
    more = next((m for m in model.modules() if isinstance(m, MORE)), None)
    return [] if more is None else list(itertools.combinations(range(more.e), more.k))


def routed(model: nn.Module, experts: tuple[int, ...], tie: float) -> AbstractContextManager[None]:
    """Within the block, every MORE of `model` routes to `experts` wherever that choice is
    within `tie` of its own (the weakest chosen gate at least the strongest other minus
    `tie`), and as usual elsewhere."""
    return overriding(model, MORE, "route_override", (experts, tie))


def text_projection(din: int, dout: int, enabled: bool, experts: int, top_k: int, weight: float) -> nn.Module:
    """MORE, or the plain Linear(D, d) the paper uses when MORE is off."""
    return MORE(din, dout, experts, top_k, weight) if enabled else nn.Linear(din, dout)
