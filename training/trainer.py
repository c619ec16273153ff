"""The training loop: stages from the recipe, AdamW with the paper's parameter groups,
warmup + step decay, grad clipping, optional bf16, progress bar, metrics.jsonl,
atomic checkpoints, resume, and torch.distributed (gloo on CPU) via torchrun.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from reir.datasets import load_dataset
from reir.datasets.synth import SynthConfig, generate

from .batches import TrainSet, collate, lookalike_keys, positives, twin_keys
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, StageConfig
from .criterion import SetCriterion, Targets
from .ema import WeightAverage
from .model import CLARE, build_model
from .neighbours import scene_facts, text_facts
from .relation_loss import relation_targets
from .text_branch import encode_by_length, load_tokenizer, tokenize


def resolve_device(name: str, where: str = "train.device") -> torch.device:
    """`train.device`: 'auto' takes the GPU when torch sees one, so a GPU host needs no edit
    of a CPU recipe; under torchrun each rank takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{where}: 'cuda', but this torch sees no GPU (torch.cuda.is_available() is False)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    raise ConfigError(f"{where}: {name!r} is not one of auto, cpu, cuda")


@contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """`train.deterministic`: kernels whose reductions do not depend on thread timing (oneDNN's
    convolution backward does on CPU: the same seed gave other weights when another process
    shared the cores). On CUDA an op without a deterministic kernel warns instead of failing;
    full CUDA determinism also needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the start.
    The setting is process-wide, so it is restored when training ends."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun initialises NCCL on GPUs, gloo on CPUs."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def param_groups(model: CLARE, criterion: SetCriterion, stage: StageConfig) -> list[dict]:
    backbone, text, context, rest = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            backbone.append(p)
        elif name.startswith("context."):
            context.append(p)
        elif name.startswith("text."):
            text.append(p)
        else:
            rest.append(p)
    rest += list(criterion.parameters())
    groups = [
        {"params": rest, "lr": stage.lr},
        {"params": backbone, "lr": stage.lr * stage.backbone_lr_mult},
        {"params": text, "lr": stage.text_lr},
    ]
    if context:  # its own group only where the model has the heads
        groups.append({"params": context, "lr": stage.lr * stage.context_lr_mult})
    return groups


def lr_factor(step: int, stage: StageConfig) -> float:
    """Linear warmup from 0.01, then x0.1 at 80% of the stage (WarmupMultiStepLR)."""
    if step < stage.warmup:
        return 0.01 + 0.99 * step / max(1, stage.warmup)
    return 0.1 if step >= int(0.8 * stage.steps) else 1.0


def prepare_data(cfg: Config, rank: int) -> Path:
    root = Path(cfg.data.root)
    if not (root / "refs.json").is_file() and cfg.data.generate_images > 0:
        if rank == 0:
            generate(root, SynthConfig(images=cfg.data.generate_images, seed=cfg.data.generate_seed), progress=True)
        if dist.is_initialized():
            dist.barrier()
    return root


class Trainer:
    def __init__(self, cfg: Config, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device = resolve_device(cfg.train.device)
        self.rank, self.world = setup_distributed(self.device)
        torch.manual_seed(cfg.seed)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = Path(cfg.out_dir) / cfg.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ds = load_dataset(prepare_data(cfg, self.rank))
        d = cfg.data
        self.train_set = TrainSet(
            self.ds, d.train_split, cfg.model.image_size, d.hflip, cfg.seed, d.composed, d.attribute_names
        )
        self.model = build_model(cfg.model).to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = SetCriterion(cfg.loss, cfg.model.dec_layers, cfg.model.d_model).to(self.device)
        self.tokenizer = load_tokenizer(cfg.model.text)
        self.skipped = 0
        self.sentence_cache: dict[str, torch.Tensor] = {}

    # -- data -----------------------------------------------------------------------
    def batches(self, epoch0: int, twins: bool = False, lookalikes: int = 0):
        epoch = epoch0
        bs = self.cfg.train.batch_size
        while True:
            self.train_set.set_epoch(epoch)
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            order = torch.randperm(len(self.train_set), generator=g)[self.rank :: self.world].tolist()
            if twins:
                order = twin_keys(order, bs, np.random.default_rng([self.cfg.seed, epoch, self.rank]))
            if lookalikes:
                rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, 1])
                order = lookalike_keys(self.train_set, order, lookalikes, rng)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(self.train_set, order),
                batch_size=bs,
                collate_fn=collate,
                num_workers=self.cfg.data.workers,
                drop_last=True,
                persistent_workers=False,
            )
            for batch in loader:
                yield epoch, batch
            epoch += 1

    def targets(self, batch, stage: StageConfig) -> Targets:
        samples = batch.samples
        texts_of = batch.texts()
        local = [(t.logic if self.cfg.loss.multi_positive else None, i) for i, t in texts_of]
        local += [(t.logic, i) for i, t in batch.contrasts()]  # labelled by exact semantics everywhere
        offset = 0
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, local)
            offset = sum(len(g) for g in gathered[: self.rank])
            texts = [t for g in gathered for t in g]
        else:
            texts = local
        return Targets(
            boxes=[s.boxes.to(self.device) for s in samples],
            labels=[s.labels.to(self.device) for s in samples],
            text_image=[i for i, _ in texts_of],
            text_target=[t.target for _, t in texts_of],
            positives=positives(samples, texts, offset),
            **(self._neighbour_facts(batch) if self.cfg.loss.neighbour_weight > 0 else {}),
            **(self._relation_targets(batch) if self._relation_loss(stage) else {}),
        )

    def _relation_loss(self, stage: StageConfig) -> bool:
        return self.cfg.loss.relation_weight > 0 and stage.relations

    def _relation_targets(self, batch) -> dict:
        """Labels of the anchor and relation-type terms (relations.py); none without logical forms."""
        if any(s.objects is None for s in batch.samples):
            return {}
        anchors, types = relation_targets([(t.logic, batch.samples[i].objects) for i, t in batch.texts()])
        return {"text_anchors": anchors, "text_relations": types}

    def _neighbour_facts(self, batch) -> dict:
        """Labels of the neighbour-naming loss (neighbours.py); none without scene objects."""
        if any(s.objects is None for s in batch.samples):
            return {}
        facts = [torch.from_numpy(scene_facts(s.objects, *s.orig_size)).to(self.device) for s in batch.samples]
        return {"facts": facts, "text_facts": text_facts([t.logic for _, t in batch.texts()], self.device)}

    # -- one step ---------------------------------------------------------------------
    def loss(self, batch, stage: StageConfig) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch.images.to(self.device)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        texts = [t.text for _, t in batch.texts() + batch.contrasts()]
        names = self.train_set.categories if stage.detection else []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16):
            outputs = self.model.encode_image(images)
            sentences = self.sentences(texts + names)
            per_layer = self.model.queries(sentences)
            relation_parts = None
            if self._relation_loss(stage):  # the texts with a target come first
                relation_parts = self.model.relation_parts(sentences[: len(batch.texts())])
        n = len(texts)
        queries = [q[:n].float() for q in per_layer]
        categories = [q[n:].float() for q in per_layer] if names else None
        outputs = {k: [t.float() for t in v] if isinstance(v, list) else v.float() for k, v in outputs.items()}
        if relation_parts is not None:
            relation_parts = (relation_parts[0].float(), [t.float() for t in relation_parts[1]])
        return self.criterion(outputs, queries, self.targets(batch, stage), stage, categories, relation_parts)

    def sentences(self, texts: list[str]) -> torch.Tensor:
        """Sentence features; memoised per text while everything that computes them is frozen."""
        pools = self.model.text_pools
        if any(p.requires_grad for p in [*self.model.text.parameters(), *(pools.parameters() if pools else [])]):
            return self._encode(texts)
        missing = sorted({t for t in texts if t not in self.sentence_cache})
        if missing:
            with torch.no_grad():
                emb = self._encode(missing).float()
            self.sentence_cache.update(zip(missing, emb, strict=True))
        return torch.stack([self.sentence_cache[t] for t in texts])

    def _encode(self, texts: list[str]) -> torch.Tensor:
        enc = tokenize(self.tokenizer, texts, self.cfg.model.text.max_length, device=self.device)
        if self.model.text.siglip:
            return self.model.encode_sentence(enc["input_ids"], enc["attention_mask"])
        return encode_by_length(self.model.encode_sentence, enc["input_ids"], enc["attention_mask"])

    # -- the loop ---------------------------------------------------------------------
    def fit(self, resume: bool = False, start_from: Path | None = None) -> Path:
        """Run the recipe's stages. `resume`: continue this run's last.pt; `start_from`: a
        checkpoint saved at the end of a stage (`<stage>.pt`) of a run with the same model
        config, whose later stages this recipe then runs (ablations of stage 2 share stage 1)."""
        with determinism(self.cfg.train.deterministic, self.device):
            return self._fit(resume, start_from)

    def _fit(self, resume: bool, start_from: Path | None) -> Path:
        cfg = self.cfg
        start_stage, start_step, epoch, state = 0, 0, 0, {}
        last = self.run_dir / "last.pt"
        source = last if resume and last.is_file() else start_from
        if source is not None:
            _, state = load_checkpoint(source)
            check_compatible(source, state, cfg)
            if source == start_from and state["step"] != 0:
                raise CheckpointError(f"{source}: saved in the middle of a stage; --start-from needs a stage's end")
            self.model.load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            start_stage, start_step, epoch = state["stage"], state["step"], state["epoch"]
        metrics_path = self.run_dir / "metrics.jsonl"
        for si, stage in enumerate(cfg.train.stages):
            if si < start_stage:
                continue
            opt = self.begin_stage(stage)
            base = [g["lr"] for g in opt.param_groups]
            step = start_step if si == start_stage else 0
            if resume and si == start_stage and step and "optimizer" in state:
                try:
                    opt.load_state_dict(state["optimizer"])
                except ValueError as e:  # e.g. saved before the context heads had their own group
                    raise CheckpointError(f"{source}: optimizer state does not fit this version ({e})") from None
            averages = self.begin_averages(stage, state if resume and si == start_stage and step else None, source)
            self.model.train()
            bar = tqdm(total=stage.steps, initial=step, desc=f"{stage.name}", disable=not self.progress or self.rank)
            t0, seen = time.perf_counter(), 0
            data = self.batches(epoch, stage.flip_twins, stage.lookalikes)
            while step < stage.steps:
                epoch, batch = next(data)
                self.skipped += batch.skipped
                if not batch.samples:
                    continue
                for g, lr in zip(opt.param_groups, base, strict=True):
                    g["lr"] = lr * lr_factor(step, stage)
                logs, grad_norm = self.step(batch, stage, opt)
                for avg in averages:
                    avg.update(self.model)
                step += 1
                seen += len(batch.samples) * self.world
                bar.update()
                if step % cfg.train.log_every == 0 or step == stage.steps:
                    rate = seen / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{logs['total']:.3f}", img_s=f"{rate:.0f}")
                    if self.rank == 0:
                        rec = {"stage": stage.name, "step": step, "epoch": epoch, "lr": opt.param_groups[0]["lr"]}
                        rec.update(logs, grad_norm=float(grad_norm), images_per_s=rate, skipped_images=self.skipped)
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                if step == stage.steps and averages:  # every rank: the next stage starts from the average
                    self.end_averages(stage, averages, epoch, si)
                if self.rank == 0 and (step % cfg.train.ckpt_every == 0 or step == stage.steps):
                    done = step == stage.steps
                    kept = None if done else averages
                    self.save(last, si + 1 if done else si, 0 if done else step, epoch, None if done else opt, kept)
                    if done and si + 1 < len(cfg.train.stages):  # e.g. grounding.pt: the stage-1-only ablation
                        self.save(self.run_dir / f"{stage.name}.pt", si + 1, 0, epoch, None)
            bar.close()
        self.model.train_relations(True, supervised=False)  # evaluated and exported as built
        if self.skipped and self.rank == 0:
            print(f"note: skipped {self.skipped} unreadable training image(s)")
        final = self.run_dir / "final.pt"
        if self.rank == 0:
            self.save(final, len(cfg.train.stages), 0, epoch, None)
        return final

    def begin_stage(self, stage: StageConfig) -> torch.optim.Optimizer:
        """What trains in `stage`, and its optimizer (at the stage's base learning rates)."""
        cfg = self.cfg
        self.model.text.freeze(cfg.model.text.trainable_layers if stage.train_text else 0)
        self.model.train_relations(stage.relations, supervised=self._relation_loss(stage))
        self.sentence_cache.clear()  # the encoder may have changed in the previous stage
        self.train_set.contrasts = stage.contrasts if stage.clia else 0
        return torch.optim.AdamW(param_groups(self.model, self.criterion, stage), weight_decay=cfg.train.weight_decay)

    def begin_averages(self, stage: StageConfig, state: dict | None, source: Path | None) -> list[WeightAverage]:
        """The stage's weight averages (`ema` first, then `ema_compare`), continued from a
        mid-stage `state` when it holds them."""
        decays = ([stage.ema] if stage.ema else []) + list(stage.ema_compare)
        averages = [WeightAverage(self.model, d) for d in decays]
        saved = (state or {}).get("averages")
        if state is not None and averages:
            if saved is None or len(saved) != len(averages):
                raise CheckpointError(f"{source}: saved without the weight averages stage {stage.name!r} keeps")
            for avg, s in zip(averages, saved, strict=True):
                try:
                    avg.load_state_dict(s)
                except ValueError as e:
                    raise CheckpointError(f"{source}: {e}") from None
        return averages

    def end_averages(self, stage: StageConfig, averages: list[WeightAverage], epoch: int, si: int) -> None:
        """Save the raw weights and each compared average beside the run; the model then holds
        the stage's `ema` (when set), which the next stage, last.pt and final.pt start from."""
        raw = {k: v.clone() for k, v in self.model.state_dict().items()}
        if stage.ema and self.rank == 0:
            self.save(self.run_dir / f"{stage.name}.raw.pt", si + 1, 0, epoch, None)
        for avg in averages[1:] if stage.ema else averages:
            self.model.load_state_dict(avg.averaged_state(self.model))
            if self.rank == 0:
                self.save(self.run_dir / f"{stage.name}.ema{avg.decay:g}.pt", si + 1, 0, epoch, None)
        self.model.load_state_dict(averages[0].averaged_state(self.model) if stage.ema else raw)

    def step(self, batch, stage: StageConfig, opt: torch.optim.Optimizer) -> tuple[dict[str, float], torch.Tensor]:
        """One optimisation step on `batch`: (logged loss terms, gradient norm before clipping)."""
        total, logs = self.loss(batch, stage)
        opt.zero_grad(set_to_none=True)
        total.backward()
        if self.world > 1:
            _average_gradients(self.model, self.criterion)
        params = [p for g in opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        opt.step()
        return logs, grad_norm

    def save(self, path: Path, stage: int, step: int, epoch: int, opt, averages=None) -> None:
        extra = {"criterion": self.criterion.state_dict(), "stage": stage, "step": step, "epoch": epoch}
        extra["categories"] = self.train_set.categories
        if opt is not None:
            extra["optimizer"] = opt.state_dict()
        if averages:
            extra["averages"] = [avg.state_dict() for avg in averages]
        save_checkpoint(path, self.cfg, self.model, extra)


def _average_gradients(*modules: torch.nn.Module) -> None:
    world = dist.get_world_size()
    for m in modules:
        for p in m.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    return Trainer(cfg, progress).fit(resume)
