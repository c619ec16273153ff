"""Exponential moving average of the weights over one stage (`train.stages[i].ema`).

A short CPU schedule ends on a noisy point of its trajectory; the average of its last
hundreds of steps is a cheaper way to a flatter one than more steps. Only what trains in
the stage is averaged (frozen weights equal their average), plus the float buffers
(BatchNorm statistics). Integer buffers are left alone: torch's `AveragedModel` blends them
in floating point and truncates, which can turn a BERT `position_ids` entry 3 into 2.
"""

from __future__ import annotations

import torch


class WeightAverage:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        floats = {n for n, b in model.named_buffers() if b.is_floating_point()}
        state = model.state_dict()
        self.tensors = {n: t.detach().clone() for n, t in state.items() if n in trainable or n in floats}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        for name, avg in self.tensors.items():
            avg.lerp_(state[name].detach(), 1.0 - self.decay)

    def averaged_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s state dict with the averaged tensors in place of its own."""
        state = dict(model.state_dict())
        state.update(self.tensors)
        return state

    def state_dict(self) -> dict:
        return {"decay": self.decay, "tensors": self.tensors}

    def load_state_dict(self, saved: dict) -> None:
        """Continue a saved average; it must cover the same tensors (same stage, same model)."""
        if set(saved["tensors"]) != set(self.tensors) or saved["decay"] != self.decay:
            raise ValueError(f"saved average (decay {saved['decay']}) does not cover this stage's weights")
        for name, t in saved["tensors"].items():
            self.tensors[name].copy_(t)
