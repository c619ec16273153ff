"""Words and templates: logical form -> English.

Two disjoint lexicons: ``TRAIN`` phrasings appear in train/val/test; ``NOVEL``
phrasings (other synonyms and other templates) appear only in `test-novel`, which
measures language generalisation. Every novel template carries at least one word
that no train expression can contain (a test checks this on generated data).
"""

from __future__ import annotations

import numpy as np

from .logic import Logic

# Each entry: canonical value -> (train words, novel words).
WORDS: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    "color": {
        "red": (["red", "crimson"], ["scarlet"]),
        "orange": (["orange"], ["amber"]),
        "yellow": (["yellow", "golden"], ["lemon"]),
        "green": (["green", "lime"], ["emerald"]),
        "cyan": (["cyan", "turquoise"], ["teal"]),
        "blue": (["blue", "navy"], ["azure"]),
        "purple": (["purple", "violet"], ["plum"]),
        "pink": (["pink", "magenta"], ["rose"]),
    },
    "shape": {
        "circle": (["circle", "round shape"], ["disc"]),
        "square": (["square", "box"], ["block"]),
        "triangle": (["triangle"], ["three sided figure"]),
        "star": (["star"], ["pentagram"]),
        "diamond": (["diamond", "rhombus"], ["lozenge"]),
        "cross": (["cross", "plus sign"], ["cruciform figure"]),
        "hexagon": (["hexagon"], ["six sided figure"]),
        None: (["shape", "object"], ["item", "thing"]),
    },
    "size": {
        "small": (["small", "little"], ["tiny"]),
        "medium": (["medium", "medium sized"], ["moderate"]),
        "large": (["large", "big"], ["huge"]),
    },
    "fill": {
        "solid": (["solid", "filled"], ["opaque"]),
        "outlined": (["outlined", "hollow"], ["unfilled"]),
    },
    "h": {"left": (["left"], ["left"]), "center": (["center", "middle"], ["central"]), "right": (["right"], ["right"])},
    "v": {"top": (["top"], ["top"]), "middle": (["middle"], ["central"]), "bottom": (["bottom"], ["bottom"])},
    # vertical words that only read well before a horizontal one ("the upper left")
    "v_adj": {
        "top": (["top", "upper"], ["top"]),
        "middle": (["middle"], ["central"]),
        "bottom": (["bottom", "lower"], ["bottom"]),
    },
    "relation": {
        "left_of": (["left of", "to the left of"], ["west of"]),
        "right_of": (["right of", "to the right of"], ["east of"]),
        "above": (["above", "over"], ["north of"]),
        "below": (["below", "under", "beneath"], ["south of"]),
        "next_to": (["next to", "beside"], ["adjacent to"]),
    },
}

# Superlatives: (by, descending) -> (train templates, novel templates); {np} is the noun phrase.
SUPERLATIVES: dict[tuple[str, bool], tuple[list[str], list[str]]] = {
    ("area", True): (["the largest {np}", "the biggest {np}"], ["the greatest {np}"]),
    ("area", False): (["the smallest {np}"], ["the tiniest {np}"]),
    ("x", False): (["the leftmost {np}", "the {np} furthest to the left"], ["the westernmost {np}"]),
    ("x", True): (["the rightmost {np}", "the {np} furthest to the right"], ["the easternmost {np}"]),
    ("y", False): (["the topmost {np}", "the highest {np}"], ["the northernmost {np}"]),
    ("y", True): (["the lowest {np}", "the bottommost {np}"], ["the southernmost {np}"]),
}
ORDINALS = {2: ("second", "2nd"), 3: ("third", "3rd")}
ORDINAL_SIDE = {("x", False): "left", ("x", True): "right", ("y", False): "top", ("y", True): "bottom"}
ORDINAL_TEMPLATES = (["the {ord} {np} from the {side}"], ["the {np} in {ord} place counting from the {side}"])

LOCATION_TEMPLATES = {
    # keys: which of h/v the location has
    "hv": (["in the {v} {h}", "at the {v} {h}"], ["located in the {v} {h} region"]),
    "h": (["on the {h}", "on the {h} side"], ["toward the {h} edge"]),
    "v": (["at the {v}", "in the {v} part"], ["toward the {v} edge"]),
    "center": (["in the center", "in the middle"], ["located centrally"]),
}
RELATION_TEMPLATES = (
    ["{target} {rel} {anchor}", "{target} that is {rel} {anchor}"],
    ["{target} which sits {rel} {anchor}"],
)
# Novel phrasing of a bare attribute expression ("the {np} here"); with a location or a
# relation following, those carry the novel words instead.
ATTRIBUTE_TEMPLATES = (["the {np}"], ["the {np} here"])


class Phraser:
    """Renders logical forms with one lexicon (train or novel) and one RNG."""

    def __init__(self, rng: np.random.Generator, novel: bool = False):
        self.rng = rng
        self.side = 1 if novel else 0

    def pick(self, options: list[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def word(self, kind: str, value: str | None) -> str:
        return self.pick(WORDS[kind][value][self.side])

    def noun_phrase(self, desc: dict[str, str]) -> str:
        adjs = [self.word(k, desc[k]) for k in ("size", "fill", "color") if k in desc]
        return " ".join([*adjs, self.word("shape", desc.get("shape"))])

    def location(self, loc: dict[str, str]) -> str:
        h, v = loc.get("h"), loc.get("v")
        if (h == "center" and v == "middle") or (h == "center" and v is None) or (v == "middle" and h is None):
            key = "center"
        elif h and v:
            key = "hv"
        else:
            key = "h" if h else "v"
        tpl = self.pick(LOCATION_TEMPLATES[key][self.side])
        v_kind = "v_adj" if key == "hv" else "v"
        return tpl.format(h=self.word("h", h) if h else "", v=self.word(v_kind, v) if v else "")

    def render(self, logic: Logic) -> str:
        np_ = self.noun_phrase(logic["target"])
        sup = logic.get("superlative")
        if sup:
            key = (sup["by"], bool(sup.get("descending", False)))
            rank = int(sup.get("rank", 1))
            if rank == 1:
                text = self.pick(SUPERLATIVES[key][self.side]).format(np=np_)
            else:
                ordinal = ORDINALS[rank][0]
                tpl = self.pick(ORDINAL_TEMPLATES[self.side])
                text = tpl.format(ord=ordinal, np=np_, side=ORDINAL_SIDE[key])
        elif logic.get("location") or logic.get("relation"):
            text = f"the {np_}"
        else:
            text = self.pick(ATTRIBUTE_TEMPLATES[self.side]).format(np=np_)
        if logic.get("location"):
            text += " " + self.location(logic["location"])
        rel = logic.get("relation")
        if rel:
            anchor = "the " + self.noun_phrase(rel["anchor"])
            tpl = self.pick(RELATION_TEMPLATES[self.side])
            text = tpl.format(target=text, rel=self.word("relation", rel["type"]), anchor=anchor)
        return " ".join(text.split())


def train_vocabulary() -> set[str]:
    """Every word a train-lexicon expression can contain."""
    return vocabulary(novel=False)


def vocabulary(novel: bool = True) -> set[str]:
    """Every word an expression can contain: the train lexicon, and with `novel` the novel one.

    The exporter keeps these words' tokens when it trims a text encoder's vocabulary."""
    lexicons = (0, 1) if novel else (0,)
    words: set[str] = set()

    def add(phrasings: tuple[list[str], list[str]]) -> None:
        for i in lexicons:
            for s in phrasings[i]:
                words.update(s.replace("{", " {").replace("}", "} ").split())

    for table in WORDS.values():
        for phrasings in table.values():
            add(phrasings)
    for phrasings in SUPERLATIVES.values():
        add(phrasings)
    for phrasings in (ORDINAL_TEMPLATES, RELATION_TEMPLATES, ATTRIBUTE_TEMPLATES, *LOCATION_TEMPLATES.values()):
        add(phrasings)
    words.update(o[i] for o in ORDINALS.values() for i in lexicons)
    return {w for w in words if not w.startswith("{")}
