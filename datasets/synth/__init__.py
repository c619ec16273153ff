"""Procedural REIR benchmark with exact multi-positive ground truth: scenes, logical forms,
their phrasings, and the generator. Training composes extra expressions with the same
parts, so they are public here."""

from .compose import Composer, choose_construct
from .contrast import counterfactual
from .generate import GENERATOR_VERSION, SynthConfig, generate, render_one
from .grammar import WORDS, Phraser, vocabulary
from .logic import (
    RELATIONS,
    matches,
    mirror_logic,
    mirror_object,
    mirror_object_vertically,
    related,
    satisfying,
)
from .scene import COLORS, FILLS, SHAPES, SIZES, SceneObject

__all__ = [
    "COLORS",
    "FILLS",
    "GENERATOR_VERSION",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "WORDS",
    "Composer",
    "Phraser",
    "SceneObject",
    "SynthConfig",
    "choose_construct",
    "counterfactual",
    "generate",
    "matches",
    "mirror_logic",
    "mirror_object",
    "mirror_object_vertically",
    "related",
    "render_one",
    "satisfying",
    "vocabulary",
]
