"""`reir bench steps`: the training-step cost of a recipe against a variant, side by side.

Two trainers in one process, one per config, take turns on the same batches (the first
config's data order), so a busy or slow machine slows both alike and the ratio stays
meaningful where a wall time would not. Per stage: the first `warmup` steps of each are
dropped, then the median and mean seconds per step and the variant's ratio to the recipe.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from reir.engine.fsutil import write_bytes_atomic
from reir.training.config import load_config
from reir.training.config import parse_overrides as overrides
from reir.training.trainer import Trainer, determinism

from .common import machine


def compare_steps(
    config: Path,
    variant: list[str],
    steps: int = 30,
    warmup: int = 3,
    out: Path | None = None,
    shared: list[str] = (),
) -> dict[str, Any]:
    """`variant`: KEY=VALUE overrides of the second config; `shared`: overrides of both."""
    base_cfg = load_config(config, overrides(list(shared)))
    var_cfg = load_config(config, overrides([*shared, *variant]))
    recipe, other = Trainer(base_cfg, progress=False), Trainer(var_cfg, progress=False)
    result: dict[str, Any] = {"config": str(config), "variant": variant, "steps": steps, "warmup": warmup, "stages": []}
    for si, stage in enumerate(base_cfg.train.stages):
        var_stage = var_cfg.train.stages[si]
        opts = recipe.begin_stage(stage), other.begin_stage(var_stage)
        recipe.model.train()
        other.model.train()
        times: tuple[list[float], list[float]] = ([], [])
        data = recipe.batches(0, stage.flip_twins, stage.lookalikes)
        for i in range(warmup + steps):
            _, batch = next(data)
            pair = ((recipe, stage, opts[0], 0), (other, var_stage, opts[1], 1))
            for trainer, st, opt, slot in pair if i % 2 == 0 else pair[::-1]:  # alternate who goes first
                t0 = time.perf_counter()
                with determinism(trainer.cfg.train.deterministic, trainer.device):
                    trainer.step(batch, st, opt)
                if i >= warmup:
                    times[slot].append(time.perf_counter() - t0)
        row = {"stage": stage.name, "recipe_s": _summary(times[0]), "variant_s": _summary(times[1])}
        row["ratio_median"] = round(row["variant_s"]["median"] / row["recipe_s"]["median"], 4)
        row["ratio_mean"] = round(row["variant_s"]["mean"] / row["recipe_s"]["mean"], 4)
        result["stages"].append(row)
        print(
            f"{stage.name}: recipe {row['recipe_s']['median']:.3f} s/step, variant {row['variant_s']['median']:.3f} "
            f"(median; x{row['ratio_median']:.3f}, mean x{row['ratio_mean']:.3f}) over {steps} steps"
        )
    result["machine"] = machine()
    if out is not None:
        write_bytes_atomic(out, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(xs), 4), "mean": round(statistics.fmean(xs), 4), "n": len(xs)}
