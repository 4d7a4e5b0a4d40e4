"""The synthetic testbed: scenes and prompts (``scenes``), a GenEval-style scorer
(``scorer``) and the shipped model trained on them (``assets/testbed``, ``model_dir()``)."""
from __future__ import annotations

from pathlib import Path

from .scenes import CATEGORIES, COLOURS, SHAPES, Group, Spec, eval_items, parse_prompt
from .scorer import find_objects, passes, score

__all__ = ["CATEGORIES", "COLOURS", "SHAPES", "Group", "Spec", "eval_items", "parse_prompt", "find_objects",
           "passes", "score", "model_dir", "layout", "tokenizer", "palette"]


def model_dir() -> Path:
    """The checkpoint shipped inside the package (the default model of ``ladr-rt generate``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "testbed"


def tokenizer():
    """Word-level tokenizer over the testbed's words; template tags are single special tokens."""
    from ..tiny import TEMPLATE_TAGS, word_tokenizer
    from .scenes import WORDS

    n_text = 2 + len(WORDS)  # <unk>, <pad>, words
    return word_tokenizer(WORDS, TEMPLATE_TAGS, uncondition_id=n_text + len(TEMPLATE_TAGS), first_tag_id=n_text)


def layout():
    """Special ids after the text vocabulary, then the codebook; DiMOO's templates kept."""
    from ..config import TokenLayout
    from ..tiny import TEMPLATE_TAGS
    from .scenes import CODEBOOK, WORDS

    base = 2 + len(WORDS) + len(TEMPLATE_TAGS)
    uncondition = base
    mask, newline, boa, eoa, boi, eoi = range(base + 1, base + 7)
    return TokenLayout(mask=mask, newline=newline, image_offset=base + 7, boi=boi, eoi=eoi, uncondition=uncondition,
                       boa=boa, eoa=eoa, codebook=CODEBOOK, vq_scale=16)


def palette():
    from ..palette import PaletteVQ
    from .scenes import CODES, RGB, SUB

    return PaletteVQ([list(RGB["background"])] + [list(RGB[c]) for c in COLOURS], scale=16,
                     codes=[list(c) for c in CODES], sub=SUB)
