"""Training data: canonical dataset -> augmented image tensors, targets, and the labels
CLIA needs (which objects of which image each text of the batch is true of).

Horizontal flips swap left/right in the text *and* in the logical form, so the
multi-positive labels stay exact. Unreadable images are skipped and counted, not fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from reir.engine.data import Dataset
from reir.engine.synth.logic import mirror_logic, mirror_object, satisfying
from reir.engine.synth.scene import SceneObject
from reir.engine.text import swap_left_right


@dataclass
class Sample:
    image: Tensor  # uint8 [3, S, S]
    boxes: Tensor  # [n, 4] normalised cxcywh
    labels: Tensor  # [n]
    target: int  # index of the referred object
    text: str
    expr_id: int
    flipped: bool
    objects: list[SceneObject] | None  # as presented (flipped if flipped), for exact positives
    logic: dict | None  # as presented
    orig_size: tuple[int, int] = (0, 0)  # (width, height) of the source image: the logic's frame


@dataclass
class Batch:
    images: Tensor  # float [B, 3, S, S] in [0, 1]
    samples: list[Sample]
    skipped: int = 0  # unreadable images dropped from this batch
    extra: dict = field(default_factory=dict)


class TrainSet(torch.utils.data.Dataset):
    def __init__(self, ds: Dataset, split: str, image_size: int, hflip: float, seed: int = 0):
        self.ds, self.size, self.hflip, self.seed = ds, image_size, hflip, seed
        self.categories = sorted({i.category for i in ds.instances.values()})
        self.cat_index = {c: n for n, c in enumerate(self.categories)}
        by_image: dict[int, list] = {}
        for e in ds.split_expressions(split):
            by_image.setdefault(ds.instances[e.instance_id].image_id, []).append(e)
        self.image_ids = sorted(by_image)
        self.exprs = by_image
        insts = ds.instances_by_image()
        self.instances = {i: sorted(insts[i], key=lambda x: x.id) for i in self.image_ids}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> Sample | None:
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        image_id = self.image_ids[idx]
        meta = self.ds.images[image_id]
        try:
            with PILImage.open(self.ds.image_path(image_id)) as f:
                img = f.convert("RGB")
                img.load()
        except (OSError, ValueError):
            return None  # counted by the collate function
        w, h = img.size
        if (w, h) != (self.size, self.size):
            img = img.resize((self.size, self.size), PILImage.BILINEAR)
        arr = np.array(img, dtype=np.uint8)  # a writable copy
        insts = self.instances[image_id]
        boxes = np.array([i.box for i in insts], dtype=np.float32).reshape(-1, 4)
        boxes[:, [0, 2]] /= max(meta.width, 1)
        boxes[:, [1, 3]] /= max(meta.height, 1)
        expr = self.exprs[image_id][int(rng.integers(len(self.exprs[image_id])))]
        text, logic = expr.text, expr.logic
        objects = None
        if all(i.attributes for i in insts):
            objects = [SceneObject(**i.attributes, box=i.box) for i in insts]
        flipped = bool(rng.random() < self.hflip)
        if flipped:
            arr = arr[:, ::-1]
            boxes[:, [0, 2]] = 1.0 - boxes[:, [2, 0]]
            text = swap_left_right(text)
            logic = mirror_logic(logic) if logic else None
            objects = [mirror_object(o, meta.width) for o in objects] if objects else None
        cxcywh = np.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2,
                (boxes[:, 1] + boxes[:, 3]) / 2,
                boxes[:, 2] - boxes[:, 0],
                boxes[:, 3] - boxes[:, 1],
            ],
            -1,
        )
        return Sample(
            image=torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1),
            boxes=torch.from_numpy(cxcywh),
            labels=torch.tensor([self.cat_index[i.category] for i in insts], dtype=torch.long),
            target=[i.id for i in insts].index(expr.instance_id),
            text=text,
            expr_id=expr.id,
            flipped=flipped,
            objects=objects,
            logic=logic,
            orig_size=(meta.width, meta.height),
        )


def collate(samples: list[Sample | None]) -> Batch:
    kept = [s for s in samples if s is not None]
    images = torch.stack([s.image for s in kept]).float() / 255.0 if kept else torch.zeros(0, 3, 1, 1)
    return Batch(images=images, samples=kept, skipped=len(samples) - len(kept))


def positives(local: list[Sample], texts: list[tuple[dict | None, int]], offset: int) -> list[list[list[int]]]:
    """[local image][global text] -> objects of that image the text is true of.

    texts: the global batch's (logical form as presented, expression id); offset: where
    this rank's texts start. Without logical forms (real data) only the image's own
    text is positive, for its referred object: the paper's labels.
    """
    out = []
    for i, s in enumerate(local):
        row = []
        for k, (logic, _) in enumerate(texts):
            if k == offset + i:
                row.append([s.target])
            elif logic is not None and s.objects is not None:
                row.append(satisfying(logic, s.objects, *s.orig_size))
            else:
                row.append([])
        out.append(row)
    return out
