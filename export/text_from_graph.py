"""A bundle's text side as a PyTorch `CLARE`, its weights read back from the ONNX graph.

Why: a shipped bundle carries no checkpoint, yet distilling its text tower
(export/distill_text.py) needs the teacher as a differentiable module with its exact
weights. The graph is traced from `CLARE.encode_text` (export/graphs.py), so every weight
is there: named initializers keep their module names (w16 ones with a `__fp16` suffix), and
each anonymous `MatMul` weight is the transpose of the `Linear` whose named bias its output
is added to. The one product with no bias (the relation code's projection) is found by its
shape. The rebuilt module reproduces the graph's queries to float rounding
(tests/test_distill.py); only the text side is loaded, the visual side stays random.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from reir.engine.runtime.bundle import Bundle
from reir.training.config import Config, from_dict
from reir.training.model import CLARE, build_model

PREFIX = "model."  # TextQuery(model): every traced parameter name starts here
HALF = "__fp16"  # export/precision.py to_w16: an fp16-stored initializer
LAYER = "text.model.encoder.layer."  # a text-tower layer's weights


def tower_depth(names: Iterable[str]) -> int:
    """How many text-tower layers the weights named `names` (graph initializers or state-dict
    keys) belong to: a distilled tower is shallower than its recipe's."""
    keys = (n.removeprefix(PREFIX) for n in names)
    return len({k.removeprefix(LAYER).split(".")[0] for k in keys if k.startswith(LAYER)})


def graph_weights(path: Path) -> dict[str, np.ndarray]:
    """{state-dict key: fp32 array} of every text-side weight in the graph at `path`."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in graph.initializer}
    values = dict(inits)  # a w16 weight is used through its Cast: the Cast's output names it
    for n in graph.node:
        if n.op_type == "Cast" and n.input[0] in inits:
            values[n.output[0]] = inits[n.input[0]]
    out = {k.removeprefix(PREFIX).removesuffix(HALF): v for k, v in inits.items() if k.startswith(PREFIX)}
    added_to: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type == "Add":
            for i in n.input:
                added_to.setdefault(i, []).extend(x for x in n.input if x != i)
    for n in graph.node:
        if n.op_type != "MatMul" or n.input[1] not in values or n.input[1].startswith(PREFIX):
            continue
        biases = [
            b for b in added_to.get(n.output[0], []) if b.startswith(PREFIX) and b.endswith((".bias", ".bias" + HALF))
        ]
        if biases:
            key = biases[0].removeprefix(PREFIX).removesuffix(HALF).removesuffix(".bias") + ".weight"
        else:
            key = f"?{n.name}"  # resolved by shape below
        out[key] = values[n.input[1]].T.copy()
    return out


def text_model(bundle: Bundle) -> CLARE:
    """The bundle's text side in PyTorch (eval mode): `encode_text` is the graph's `query`."""
    cfg = from_dict(Config, bundle.manifest["source"]["config"])
    model = build_model(cfg.model)
    weights = graph_weights(bundle.graph("text_encoder"))
    state = model.state_dict()
    for key in [k for k in weights if k.startswith("?")]:
        w = weights.pop(key)
        want = [
            k for k in state if k.endswith("code.project.weight") and k not in weights and state[k].shape == w.shape
        ]
        last = [k for k in want if k.startswith(f"relation_slots.{len(model.text_proj) - 1}.")]
        if len(last) != 1:
            raise ValueError(f"{bundle.path}: cannot place the text graph's weight {key[1:]} {w.shape}")
        weights[last[0]] = w
    vocab, width = weights["text.model.embeddings.word_embeddings.weight"].shape
    if vocab != model.text.model.embeddings.word_embeddings.num_embeddings:  # a trimmed vocabulary
        frozen = not model.text.model.embeddings.word_embeddings.weight.requires_grad
        model.text.model.embeddings.word_embeddings = torch.nn.Embedding(vocab, width, padding_idx=0)
        model.text.model.embeddings.word_embeddings.requires_grad_(not frozen)  # as the recipe froze it
    kept = tower_depth(weights)
    model.text.model.encoder.layer = model.text.model.encoder.layer[:kept]  # a distilled tower is shallower
    model.text.model.config.num_hidden_layers = kept
    unknown = set(weights) - set(model.state_dict())
    if unknown:
        raise ValueError(f"{bundle.path}: text graph weights the model does not have: {sorted(unknown)[:5]}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    return model.eval()
