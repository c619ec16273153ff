"""MORE: Mix of Relation Experts (clare.md §5).

    shared = W_s x + b_s;  g = softmax(W_g x + b_g);  (v, idx) = topk(g, K)   (not renormalised)
    routed = sum_r v_r (W_idx_r x + b_idx_r);  T = (1 - w) shared + w routed

Routing is per expression; no auxiliary loss. All experts are evaluated and masked,
which is exact, cheap at these sizes and exports to ONNX without dynamic control flow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MORE(nn.Module):
    def __init__(self, din: int, dout: int, experts: int = 4, top_k: int = 2, weight: float = 0.2):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"MORE: top_k must be in 1..experts, got {top_k} of {experts}")
        self.shared = nn.Linear(din, dout)
        self.router = nn.Linear(din, experts)
        self.experts = nn.Linear(din, experts * dout)  # E stacked Linear(din, dout)
        self.e, self.k, self.w, self.dout = experts, top_k, weight, dout

    def gates(self, x: Tensor) -> Tensor:
        """Softmax router weights with all but the top-K zeroed: [B, E]."""
        g = torch.softmax(self.router(x), -1)
        kth = torch.topk(g, self.k, dim=-1).values[..., -1:]
        return torch.where(g >= kth, g, torch.zeros_like(g))

    def forward(self, x: Tensor) -> Tensor:
        routed = (self.gates(x)[..., None] * self.experts(x).view(*x.shape[:-1], self.e, self.dout)).sum(-2)
        return (1 - self.w) * self.shared(x) + self.w * routed


def text_projection(din: int, dout: int, enabled: bool, experts: int, top_k: int, weight: float) -> nn.Module:
    """MORE, or the plain Linear(D, d) the paper uses when MORE is off."""
    return MORE(din, dout, experts, top_k, weight) if enabled else nn.Linear(din, dout)
