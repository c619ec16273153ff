"""Training data: canonical dataset -> augmented image tensors, targets, and the labels
CLIA needs (which objects of which image each text of the batch is true of).

Each image brings one of its dataset expressions and, for synthetic scenes, up to
`composed` more expressions composed on the fly from the scene's objects with the
benchmark's own grammar (train lexicon only, so `test-novel` stays unseen). One
expression per image wastes most of a scene's supervision; this is the cheapest way
to more of it on CPU.

Horizontal flips swap left/right in the text *and* in the logical form, so the
multi-positive labels stay exact. Unreadable images are skipped and counted, not fatal.

Flip twins (a stage's `flip_twins`): the batch holds each scene twice, the second time
mirrored left-right, top-bottom or both, with expressions composed in its own frame. The
twin has every object of the original with the same attributes but reversed relations
and locations, so "the circle left of the red star" finds, in its twin, the same circle
now right of it: an exact negative that differs from a positive only by the relation.
Random batches almost never hold such pairs, and CLIA otherwise learns attributes only.

Look-alike groups (a stage's `lookalikes`): each drawn image comes with `lookalikes` more
that hold an instance of the same detection name as one of its own ("small solid red
square", or the category on real data) in another context, and each describes that
instance first. A 1,000-image gallery holds about 16 look-alikes per instance, and a
relation query must outrank them all by what lies around its target; in a random batch of
32 only 40% of the instances meet even one. Exact answer sets label the look-alikes that
also satisfy a text as positives; the others are the hard negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from reir.datasets import Dataset
from reir.datasets.synth import (
    Composer,
    Phraser,
    SceneObject,
    choose_construct,
    counterfactual,
    mirror_logic,
    mirror_object,
    mirror_object_vertically,
    satisfying,
)
from reir.engine.runtime.expressions import swap_left_right
from reir.engine.runtime.image import load_rgb


@dataclass
class Text:
    text: str
    target: int  # index of the referred object in its image
    logic: dict | None  # as presented (mirrored with the image)


@dataclass
class Sample:
    image: Tensor  # uint8 [3, S, S]
    boxes: Tensor  # [n, 4] normalised cxcywh
    labels: Tensor  # [n]
    texts: list[Text]
    objects: list[SceneObject] | None  # as presented, for exact positives
    contrasts: list[Text]  # counterfactuals of `texts`, false of their targets (CLIA negatives)
    orig_size: tuple[int, int]  # (width, height) of the source image: the logic's frame


@dataclass
class Batch:
    images: Tensor  # float [B, 3, S, S] in [0, 1]
    samples: list[Sample]
    skipped: int = 0  # unreadable images dropped from this batch

    def texts(self) -> list[tuple[int, Text]]:
        """(local image index, text) for every text of the batch, in order."""
        return [(i, t) for i, s in enumerate(self.samples) for t in s.texts]

    def contrasts(self) -> list[tuple[int, Text]]:
        """(local image index, counterfactual text): CLIA-only texts, after `texts()` in the batch."""
        return [(i, t) for i, s in enumerate(self.samples) for t in s.contrasts]


ATTRIBUTE_ORDER = ("size", "fill", "color", "shape")  # English adjective order


class TrainSet(torch.utils.data.Dataset):
    def __init__(
        self,
        ds: Dataset,
        split: str,
        image_size: int,
        hflip: float,
        seed: int = 0,
        composed: int = 0,
        attribute_names: bool = False,
    ):
        self.ds, self.size, self.hflip, self.seed, self.composed = ds, image_size, hflip, seed, composed
        self.attribute_names = attribute_names
        self.categories = sorted({self.name_of(i) for i in ds.instances.values()})
        self.cat_index = {c: n for n, c in enumerate(self.categories)}
        by_image: dict[int, list] = {}
        for e in ds.split_expressions(split):
            by_image.setdefault(ds.instances[e.instance_id].image_id, []).append(e)
        self.image_ids = sorted(by_image)
        self.exprs = by_image
        insts = ds.instances_by_image()
        self.instances = {i: sorted(insts[i], key=lambda x: x.id) for i in self.image_ids}
        self.by_name: dict[str, list[int]] = {}  # detection name -> image indices holding one
        for n, i in enumerate(self.image_ids):
            for name in sorted({self.name_of(x) for x in self.instances[i]}):
                self.by_name.setdefault(name, []).append(n)
        self.epoch = 0
        self.contrasts = 0  # counterfactual texts per image (set per stage: only CLIA uses them)

    def name_of(self, inst) -> str:
        """The detection name of an instance: its category, or with `attribute_names` (synthetic
        data) its attributes too, "small solid green square", so that stage 1 must put colour,
        size and fill into the instance embedding, not only the shape."""
        if self.attribute_names and inst.attributes:
            return " ".join(inst.attributes[k] for k in ATTRIBUTE_ORDER if k in inst.attributes)
        return inst.category

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple) -> Sample | None:
        """key: an image index, or (index, twin) with twin 1/2/3 = mirrored in x / y / both,
        or (index, 0, name): compose an expression for its instance of that name first."""
        idx, twin, focus = (*key, None)[:3] if isinstance(key, tuple) else (key, 0, None)
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        image_id = self.image_ids[idx]
        meta = self.ds.images[image_id]
        arr = load_rgb(self.ds.image_path(image_id), self.size)
        if arr is None:
            return None  # counted by the collate function
        insts = self.instances[image_id]
        ids = [i.id for i in insts]
        boxes = np.array([i.box for i in insts], dtype=np.float32).reshape(-1, 4)
        boxes[:, [0, 2]] /= max(meta.width, 1)
        boxes[:, [1, 3]] /= max(meta.height, 1)
        expr = self.exprs[image_id][int(rng.integers(len(self.exprs[image_id])))]
        objects = [SceneObject(**i.attributes, box=i.box) for i in insts] if all(i.attributes for i in insts) else None
        flipped = bool(rng.random() < self.hflip)
        text, logic = expr.text, expr.logic
        if flipped:
            arr, boxes, objects = _mirror(arr, boxes, objects, meta.width, meta.height, x=True, y=False)
            text = swap_left_right(text)
            logic = mirror_logic(logic) if logic else None
        texts = [Text(text, ids.index(expr.instance_id), logic)]
        if twin and objects:
            x, y = bool(twin & 1), bool(twin & 2)
            arr, boxes, objects = _mirror(arr, boxes, objects, meta.width, meta.height, x=x, y=y)
            texts = self._compose(objects, meta.width, meta.height, rng, exclude=None, count=1 + self.composed)
        elif objects and self.composed:
            focus_on = [n for n, i in enumerate(insts) if focus is not None and self.name_of(i) == focus]
            texts += self._compose(objects, meta.width, meta.height, rng, exclude=texts[0].target, first=focus_on)
        contrasts = self._contrasts(texts, objects, meta.width, meta.height, rng) if objects else []
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
            image=torch.from_numpy(arr).permute(2, 0, 1),
            boxes=torch.from_numpy(cxcywh),
            labels=torch.tensor([self.cat_index[self.name_of(i)] for i in insts], dtype=torch.long),
            texts=texts,
            objects=objects,
            contrasts=contrasts,
            orig_size=(meta.width, meta.height),
        )

    def _contrasts(self, texts: list[Text], objects: list[SceneObject], w: int, h: int, rng) -> list[Text]:
        """Up to `contrasts` counterfactuals of this image's expressions, relations and other
        context-bound ones first (attribute expressions are the easy ones)."""
        if not self.contrasts:
            return []
        pool = [t for t in texts if t.logic]
        pool = [pool[i] for i in rng.permutation(len(pool))]
        pool.sort(key=lambda t: not any(t.logic.get(k) for k in ("location", "relation", "superlative")))
        out, phr = [], Phraser(rng)
        for t in pool[: self.contrasts]:
            logic = counterfactual(t.logic, objects, w, h, t.target, rng)
            if logic is not None:
                out.append(Text(phr.render(logic), -1, logic))
        return out

    def _compose(
        self,
        objects: list[SceneObject],
        w: int,
        h: int,
        rng: np.random.Generator,
        exclude: int | None,
        count: int | None = None,
        first: Sequence[int] = (),
    ) -> list[Text]:
        """Expressions for other objects of the (already flipped) scene: their logic is in its
        frame. Objects in `first` (look-alike groups) are described before the others."""
        comp, phr = Composer(objects, w, h, rng), Phraser(rng)
        others = [int(i) for i in rng.permutation([i for i in range(len(objects)) if i != exclude])]
        others.sort(key=lambda i: i not in first)  # stable: the same draw as without `first`
        out = []
        for t in others[: self.composed if count is None else count]:
            logic = comp.describe(int(t), choose_construct(rng))
            if logic is not None:
                out.append(Text(phr.render(logic), int(t), logic))
        return out


def twin_keys(indices: list[int], batch_size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Dataset keys for batches of flip twins: each run of batch_size // 2 images, then the
    same images mirrored (x, y or both, drawn per image)."""
    half = max(1, batch_size // 2)
    keys: list[tuple[int, int]] = []
    for start in range(0, len(indices) - half + 1, half):
        chunk = indices[start : start + half]
        keys += [(i, 0) for i in chunk] + [(i, int(rng.integers(1, 4))) for i in chunk]
    return keys


def lookalike_keys(
    train: TrainSet, indices: list[int], group: int, rng: np.random.Generator
) -> list[tuple[int, int, str]]:
    """Dataset keys: each index, with the detection name of one of its instances drawn, then
    `group` other images that hold an instance of that name. Every image of the group
    describes its instance of that name first, so each of those texts meets `group`
    look-alikes in the batch."""
    keys: list[tuple[int, int, str]] = []
    for i in indices:
        names = sorted({train.name_of(x) for x in train.instances[train.image_ids[i]]})
        name = names[int(rng.integers(len(names)))]
        pool = train.by_name[name]
        keys.append((i, 0, name))
        for _ in range(group):
            j = i
            for _ in range(8):  # another image, unless the name is (nearly) unique to this one
                j = int(pool[int(rng.integers(len(pool)))])
                if j != i:
                    break
            keys.append((j, 0, name))
    return keys


def _mirror(
    arr: np.ndarray, boxes: np.ndarray, objects: list[SceneObject] | None, w: int, h: int, x: bool, y: bool
) -> tuple[np.ndarray, np.ndarray, list[SceneObject] | None]:
    """The scene mirrored in x and/or y: pixels, normalised xyxy boxes and objects (None for
    real data without attributes) together."""
    boxes = boxes.copy()
    if x:
        arr = arr[:, ::-1]
        boxes[:, [0, 2]] = 1.0 - boxes[:, [2, 0]]
        objects = [mirror_object(o, w) for o in objects] if objects else objects
    if y:
        arr = arr[::-1]
        boxes[:, [1, 3]] = 1.0 - boxes[:, [3, 1]]
        objects = [mirror_object_vertically(o, h) for o in objects] if objects else objects
    return np.ascontiguousarray(arr), boxes, objects


def collate(samples: list[Sample | None]) -> Batch:
    kept = [s for s in samples if s is not None]
    images = torch.stack([s.image for s in kept]).float() / 255.0 if kept else torch.zeros(0, 3, 1, 1)
    return Batch(images=images, samples=kept, skipped=len(samples) - len(kept))


def positives(local: list[Sample], texts: list[tuple[dict | None, int | None]], offset: int) -> list[list[list[int]]]:
    """[local image][global text] -> objects of that image the text is true of.

    texts: the global batch's (logical form as presented, owner) where owner is the text's
    local image index on its own rank; offset: where this rank's texts start. A text is
    always positive for its own target; without logical forms (real data) that is all:
    the paper's labels.
    """
    own: dict[int, tuple[int, int]] = {}
    k = offset
    for i, s in enumerate(local):
        for t in s.texts:
            own[k] = (i, t.target)
            k += 1
    out = []
    for i, s in enumerate(local):
        row = []
        for k, (logic, _) in enumerate(texts):
            if k in own:
                row.append([own[k][1]] if own[k][0] == i else _true_in(logic, s))
            else:
                row.append(_true_in(logic, s))
        out.append(row)
    return out


def _true_in(logic: dict | None, s: Sample) -> list[int]:
    if logic is None or s.objects is None:
        return []
    return satisfying(logic, s.objects, *s.orig_size)
