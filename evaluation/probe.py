"""What the gallery's instance embeddings say about each attribute (synthetic data).

Cross-image retrieval can only rank by what an instance embedding encodes. This probe
matches every detection to a ground-truth instance (IoU >= 0.5), centres and L2-normalises
the embeddings, and classifies each attribute (shape, colour, size, fill) by the nearest class
centroid, fitting on half the instances and scoring on the other half (a fixed split). An
attribute near chance is one the visual branch drops, whatever the text side does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .boxes import MATCH_IOU, pairwise_iou


def attribute_probe(dets: Mapping[int, object], instances_by_image: Mapping[int, list]) -> dict[str, dict[str, float]]:
    """{attribute: {"accuracy", "chance", "n"}} in percent; empty without attributes.

    `dets`: image id -> detections with `.boxes` and `.embeddings`; `instances_by_image`:
    image id -> its ground-truth instances (with `.box` and `.attributes`)."""
    emb, attrs = [], []
    for image, d in dets.items():
        insts = [i for i in instances_by_image.get(image, []) if i.attributes]
        if not insts or not len(d.boxes):
            continue
        iou = pairwise_iou(np.asarray(d.boxes, np.float64), np.asarray([i.box for i in insts], np.float64))
        for j, inst in enumerate(insts):
            k = int(iou[:, j].argmax())
            if iou[k, j] >= MATCH_IOU:
                emb.append(np.asarray(d.embeddings[k], np.float64))
                attrs.append(inst.attributes)
    if len(emb) < 4:
        return {}
    x = np.stack(emb)
    x -= x.mean(0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    order = np.random.default_rng(0).permutation(len(x))
    fit, score = order[: len(x) // 2], order[len(x) // 2 :]
    out = {}
    for name in sorted({k for a in attrs for k in a}):
        y = np.array([a.get(name, "") for a in attrs])
        classes = sorted(set(y[fit]))
        if len(classes) < 2:
            continue
        centroids = np.stack([x[fit][y[fit] == c].mean(0) for c in classes])
        pred = np.array(classes)[(x[score] @ centroids.T).argmax(1)]
        out[name] = {
            "accuracy": 100.0 * float((pred == y[score]).mean()),
            "chance": 100.0 / len(classes),
            "n": float(len(score)),
        }
    return out
