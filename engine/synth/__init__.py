"""Procedural REIR benchmark with exact multi-positive ground truth."""

from .generate import GENERATOR_VERSION, SynthConfig, generate, render_one

__all__ = ["GENERATOR_VERSION", "SynthConfig", "generate", "render_one"]
