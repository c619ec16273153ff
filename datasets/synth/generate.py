"""`reir synth`: write a synthetic REIR benchmark in the canonical format.

Deterministic for a given (seed, GENERATOR_VERSION, arguments): image i draws from
its own RNG stream ``default_rng([seed, i])``, so the output does not depend on the
number of workers, and a prefix of a larger set equals the smaller set's images.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from reir.engine.fsutil import atomic_directory

from ..canonical import write_canonical
from ..dataset import Dataset, Expression, Image, Instance
from .compose import Composer, choose_construct
from .grammar import Phraser
from .logic import Logic, expression_type, satisfying
from .png import write_png
from .scene import SceneObject, render_scene

GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
ANSWER_SPLITS = {"eval": EVAL_SPLITS, "all": SPLITS, "none": ()}  # --answers: galleries with exact answer sets


def answered_splits(mode: str) -> tuple[str, ...]:
    """Query splits with exact answer sets (test-novel shares the test gallery)."""
    galleries = ANSWER_SPLITS[mode]
    return (*galleries, "test-novel") if "test" in galleries else galleries


@dataclass(frozen=True)
class SynthConfig:
    images: int
    seed: int = 0
    size: int = 128
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    exprs_per_image: int = 2
    answers: str = "eval"  # which splits get exact answer sets: eval | all | none
    answer_sample: int = 0  # 0: every expression of those splits; N: only N drawn per split
    workers: int = 1

    def split_of(self, idx: int) -> str:
        n_train = round(self.images * self.fractions[0])
        n_val = round(self.images * self.fractions[1])
        if idx < n_train:
            return "train"
        return "val" if idx < n_train + n_val else "test"


@dataclass
class Rendered:
    idx: int
    objects: list[SceneObject]
    exprs: list[tuple[int, Logic, str, str | None]]  # target, logic, text, novel text


def render_one(cfg: SynthConfig, idx: int, image_dir: Path | None) -> tuple[np.ndarray, Rendered]:
    rng = np.random.default_rng([cfg.seed, idx])
    image, objs = render_scene(rng, cfg.size)
    comp = Composer(objs, cfg.size, cfg.size, rng)
    train_phr, novel_phr = Phraser(rng), Phraser(rng, novel=True)
    exprs = []
    k = min(cfg.exprs_per_image, len(objs))
    for t in rng.choice(len(objs), size=k, replace=False):
        logic = comp.describe(int(t), choose_construct(rng))
        if logic is None:
            continue  # an exact twin with nothing to tell it apart: nobody can refer to it
        novel = novel_phr.render(logic) if cfg.split_of(idx) == "test" else None
        exprs.append((int(t), logic, train_phr.render(logic), novel))
    if image_dir is not None:
        write_png(image_dir / image_file(idx), image)
    return image, Rendered(idx, objs, exprs)


def image_file(idx: int) -> str:
    return f"{idx + 1:07d}.png"


def _worker(args: tuple[SynthConfig, int, Path]) -> Rendered:
    cfg, idx, image_dir = args
    return render_one(cfg, idx, image_dir)[1]


def _render_all(cfg: SynthConfig, image_dir: Path, progress: bool) -> Iterator[Rendered]:
    jobs = ((cfg, i, image_dir) for i in range(cfg.images))
    bar = tqdm(total=cfg.images, desc="synth", unit="img", disable=not progress, smoothing=0.1)
    if cfg.workers <= 1:
        for job in jobs:
            yield _worker(job)
            bar.update()
    else:
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            for r in pool.imap(_worker, jobs, chunksize=32):
                yield r
                bar.update()
    bar.close()


def build_dataset(cfg: SynthConfig, rendered: Sequence[Rendered], root: Path, progress: bool = False) -> Dataset:
    ds = Dataset(root=root, image_root=root / "images")
    next_inst, next_expr = 1, 1
    scenes: dict[int, tuple[list[SceneObject], list[int]]] = {}
    for r in rendered:
        image_id = r.idx + 1
        split = cfg.split_of(r.idx)
        ds.images[image_id] = Image(image_id, image_file(r.idx), cfg.size, cfg.size, split)
        inst_ids = []
        for o in r.objects:
            attrs = {"shape": o.shape, "color": o.color, "size": o.size, "fill": o.fill}
            ds.instances[next_inst] = Instance(next_inst, image_id, tuple(float(v) for v in o.box), o.shape, attrs)
            inst_ids.append(next_inst)
            next_inst += 1
        scenes[image_id] = (r.objects, inst_ids)
        for t, logic, text, novel in r.exprs:
            for s, txt, is_novel in ((split, text, False), ("test-novel", novel, True)):
                if txt is None:
                    continue
                ds.expressions[next_expr] = Expression(
                    next_expr, txt, inst_ids[t], s, expression_type(logic), is_novel, logic
                )
                next_expr += 1
    for split in ANSWER_SPLITS[cfg.answers]:
        _attach_answers(ds, scenes, split, cfg.size, progress, _sampler(cfg, split))
    return ds


def _sampler(cfg: SynthConfig, split: str):
    """With `answer_sample` N: keep N of a split's expressions, drawn from the seed alone.

    Exact answer sets cost expressions x gallery images (hours at 100k images for all of
    them); a sample keeps accuracy measurable on galleries that big."""
    if cfg.answer_sample <= 0:
        return None
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), 7919])

    def sample(ids: list[int]) -> set[int]:
        return set(rng.permutation(ids)[: cfg.answer_sample].tolist())

    return sample


def _attach_answers(ds: Dataset, scenes: dict, split: str, size: int, progress: bool = False, sample=None) -> None:
    """Exact answer sets: every instance of the split's gallery each expression is true of.

    Instances are first filtered on the target's attributes with numpy; the full
    logical form is then evaluated only in the images that survive. `sample`, when given,
    picks the expressions (by id, of the split's own) that get one; test-novel follows
    test's pick, since the two share logical forms."""
    gallery = [i for i, im in ds.images.items() if im.split == split]
    if not gallery:
        return
    inst_img = np.concatenate([[i] * len(scenes[i][0]) for i in gallery]).astype(np.int64)
    columns = {
        a: np.array([getattr(o, a) for i in gallery for o in scenes[i][0]]) for a in ("shape", "color", "size", "fill")
    }
    query_splits = (split, "test-novel") if split == "test" else (split,)
    queries = [e for e in ds.expressions.values() if e.split in query_splits]
    if sample is not None:
        own = [e for e in queries if e.split == split]
        picked = sample([e.id for e in own])
        # the test-novel rephrasing of a picked expression: same target, same logical form
        born = {(e.instance_id, _logic_key(e.logic)) for e in own if e.id in picked}
        twins = [e for e in queries if e.split != split and (e.instance_id, _logic_key(e.logic)) in born]
        queries = [e for e in own if e.id in picked] + twins

    def having(desc: dict[str, str]) -> np.ndarray:
        mask = np.ones(len(inst_img), dtype=bool)
        for a, v in desc.items():
            mask &= columns[a] == v
        return np.unique(inst_img[mask])

    cache: dict[str, tuple[int, ...]] = {}  # test and test-novel share logical forms
    for e in tqdm(queries, desc=f"answer sets ({split})", unit="expr", disable=not progress, mininterval=1.0):
        logic = e.logic
        key = _logic_key(logic)
        if key in cache:
            ds.expressions[e.id] = replace(e, answers=cache[key])
            continue
        images = having(logic["target"])
        if logic.get("relation"):
            images = np.intersect1d(images, having(logic["relation"]["anchor"]), assume_unique=True)
        found: list[int] = []
        for image_id in images:
            objs, ids = scenes[int(image_id)]
            found.extend(ids[k] for k in satisfying(logic, objs, size, size))
        cache[key] = tuple(sorted(found))
        ds.expressions[e.id] = replace(e, answers=cache[key])


def _logic_key(logic: Logic) -> str:
    """Equal logical forms, equal keys (test and test-novel share forms)."""
    return json.dumps(logic, sort_keys=True)


def generate(out: Path, cfg: SynthConfig, overwrite: bool = False, progress: bool = True) -> tuple[Dataset, float]:
    """Write the benchmark to `out` atomically; returns the dataset and images/s."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        image_dir = tmp / "images"
        image_dir.mkdir()
        t0 = time.perf_counter()
        rendered = list(_render_all(cfg, image_dir, progress))
        ds = build_dataset(cfg, rendered, tmp, progress)
        elapsed = time.perf_counter() - t0
        ds.meta = {
            "description": "clare-reir synthetic REIR benchmark",
            "generator": {"name": "clare-reir synth", "version": GENERATOR_VERSION, **asdict(cfg)},
            "answers": list(answered_splits(cfg.answers)),
            "splits": ds.split_counts(),
        }
        write_canonical(ds, tmp)
    ds.root, ds.image_root = Path(out), Path(out) / "images"
    return ds, cfg.images / max(elapsed, 1e-9)
