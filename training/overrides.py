"""A discrete choice of the model forced for the length of a block.

The export gates (export/ties.py) ask what the fp32 model answers under the other side of a
tie: MORE's expert routing (`more.routed`) or the proposal ranking (`proposals.swapped`).
Each module kind reads its override attribute in `forward`; this sets it and clears it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def overriding(model: nn.Module, kind: type[nn.Module], attr: str, value: Any) -> Iterator[None]:
    """Within the block, `attr` of every `kind` module of `model` is `value`; after it, None
    (the traced and exported graph never sees an override)."""
    modules = [m for m in model.modules() if isinstance(m, kind)]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m in modules:
            setattr(m, attr, None)
