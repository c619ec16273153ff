"""Checkpoints: config + weights + tokenizer + versions, written atomically, loaded safely.

`torch.load(weights_only=True)` only: a checkpoint is data, never code. A checkpoint
from another model config fails with the fields that differ.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from reir.engine.errors import ReirError
from reir.engine.fsutil import atomic_file

from .config import Config, ConfigError, architecture_diffs, from_dict

FORMAT = "clare-reir/checkpoint"
VERSION = 1


class CheckpointError(ReirError, ValueError):
    pass


def versions() -> dict[str, str]:
    import transformers  # its version goes into the checkpoint; a second to import

    return {
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "python": platform.python_version(),
    }


def save_checkpoint(path: Path, cfg: Config, model: torch.nn.Module, extra: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "tokenizer": cfg.model.text.encoder,
        "versions": versions(),
        **(extra or {}),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> tuple[Config, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe content
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clare-reir checkpoint")
    try:
        cfg = from_dict(Config, state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not load here ({e})") from None
    return cfg, state


def check_compatible(path: Path, saved: dict[str, Any], cfg: Config) -> None:
    """Refuse to resume or load into a model built from a different model config."""
    diffs = architecture_diffs(saved["config"]["model"], cfg.to_dict()["model"])
    if diffs:
        raise CheckpointError(f"{path}: made with a different model config: " + "; ".join(diffs))


def load_model(path: Path):
    """(config, model in eval mode) from a checkpoint; errors name the file and the problem."""
    cfg, state = load_checkpoint(path)
    return cfg, model_from_state(path, cfg, state)


def model_from_state(path: Path, cfg: Config, state: dict[str, Any]):
    """The eval-mode model of an already loaded checkpoint (for callers that also read its
    other entries, so the file is read once)."""
    from .model import build_model  # model imports this module

    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config builds ({str(e)[:300]})") from None
    return model.eval()
