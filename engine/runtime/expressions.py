"""Expression cleaning, shared by training and the runtime so both see the same text.

As the CLARE code's `clean_string`: lower-case; delete . , ' ! ? " ( ) * # : ;
replace - and / with a space; collapse whitespace. Horizontal flips swap left/right
words (`swap_left_right`), so training augmentation keeps the text true. (The paper also
disables random crops for ordinal expressions; we do not crop.)
"""

from __future__ import annotations

import re

_DELETE = str.maketrans("", "", ".,'!?\"()*#:;")
_SPACE = str.maketrans({"-": " ", "/": " "})
_LR = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_LR_RE = re.compile(r"\b(" + "|".join(_LR) + r")\b")


def clean_expression(text: str) -> str:
    return " ".join(text.lower().translate(_DELETE).translate(_SPACE).split())


def swap_left_right(text: str) -> str:
    """The expression that is true of the mirrored image ("left" <-> "right")."""
    return _LR_RE.sub(lambda m: _LR[m.group(1)], text)
