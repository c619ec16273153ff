"""The fp32 model's own answers under the discrete choices a reduced-precision graph may flip.

Two choices in CLARE are argmax-like: MORE routes each text query to its top-K experts, and
the visual branch pairs the top-Q encoder proposals (by objectness) with per-rank content
queries. Where the fp32 model sits within rounding of another choice, an fp16 graph may take
it and give a different but equally valid answer. The gates compare such an answer with the
fp32 model's answer under the choice it took (export/gates.py `parity`), and count the flips,
so that they measure precision and not which side of a tie the rounding fell.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from reir.evaluation.protocol import DetectFn, EncodeTextFn
from reir.training.config import EvalConfig
from reir.training.evaluate import torch_detector
from reir.training.more import routed, tie_routings
from reir.training.proposals import ProposalSelector, swapped, tied_ranks

# In softmax gate units: another choice of K experts this close to the fp32 model's own.
ROUTING_TIE = 0.01
# In objectness logit units. Measured on the tiny test model's fp16 visual graph: exchanges at
# logit gaps of 7e-5 and 1e-3; this is ten times the larger.
PROPOSAL_TIE = 0.01

Detections = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def routing_alternatives(model: torch.nn.Module, encode: EncodeTextFn) -> tuple[EncodeTextFn, ...]:
    """The PyTorch queries under each other MORE routing, where it ties."""

    def under(experts: tuple[int, ...]) -> EncodeTextFn:
        def encode_routed(texts: list[str]) -> np.ndarray:
            with routed(model, experts, ROUTING_TIE):
                return encode(texts)

        return encode_routed

    return tuple(under(e) for e in tie_routings(model))


def proposal_alternatives(model: torch.nn.Module, cfg: EvalConfig) -> Callable[[np.ndarray], list[Detections]]:
    """A function of a batch of images: the PyTorch detections with each pair of tied
    proposal ranks exchanged (one pass per rank that ties in some image of the batch)."""
    detect: DetectFn = torch_detector(model, cfg)
    selector = next((m for m in model.modules() if isinstance(m, ProposalSelector)), None)

    def alternatives(images: np.ndarray) -> list[Detections]:
        if selector is None:
            return []
        logits: list[torch.Tensor] = []
        hook = selector.objectness.register_forward_hook(lambda _m, _i, out: logits.append(out.squeeze(-1)))
        try:
            detect(images)
        finally:
            hook.remove()
        ranks = tied_ranks(torch.cat(logits), selector.num_queries, PROPOSAL_TIE)
        out = []
        for rank in ranks:
            with swapped(model, rank, PROPOSAL_TIE):
                out.append(detect(images))
        return out

    return alternatives
