"""The synthetic testbed: scenes and prompts (``scenes``), a GenEval-style scorer (``scorer``),
the sampler diagnostics and the evaluation loop the study and the training scripts use.

Research tooling, kept out of the runtime: it imports ``ladr_rt`` and ``ladr_rt`` never imports it.
The models trained on these scenes ship inside the runtime (``ladr_rt/assets``; ``model_dir()``
is ``ladr_rt.shipped.model_dir``)."""
from __future__ import annotations

from pathlib import Path

from ladr_rt.shipped import model_dir

from .scenes import CATEGORIES, COLOURS, SHAPES, Group, Spec, eval_items, parse_prompt
from .scorer import find_objects, passes, score

__all__ = ["CATEGORIES", "COLOURS", "SHAPES", "Group", "Spec", "eval_items", "parse_prompt", "find_objects",
           "passes", "score", "model_dir", "layout", "tokenizer", "palette", "palette_v3", "TESTBEDS", "scorer_for",
           "testbed_of"]

TESTBEDS = ("v2", "v3", "v3-slots")  # v2: the shipped model's data; v3: scenes_v3 free layout; v3-slots: its control


def testbed_of(model: Path | str) -> str:
    """"v2" or "v3": whose codebook a testbed checkpoint's config.json declares (both v3 layouts
    share one codebook and one scorer)."""
    from ladr_rt.checkpoint import read_config
    from . import scenes, scenes_v3

    codebook = read_config(model).layout.codebook
    kinds = {scenes.CODEBOOK: "v2", scenes_v3.CODEBOOK: "v3"}
    if codebook not in kinds:
        raise ValueError(f"{model}: a codebook of {codebook} codes is no testbed's (v2: {scenes.CODEBOOK}, "
                         f"v3: {scenes_v3.CODEBOOK})")
    return kinds[codebook]


def scorer_for(testbed: str):
    """(specs, grids) -> score dict: v2's scorer, or scorer v3 (which adds coherence and continuity)."""
    from . import scorer_v3

    return score if testbed == "v2" else scorer_v3.score


def tokenizer():
    """Word-level tokenizer over the testbed's words; template tags are single special tokens."""
    from ladr_rt.tiny import TEMPLATE_TAGS, word_tokenizer
    from .scenes import WORDS

    n_text = 2 + len(WORDS)  # <unk>, <pad>, words
    return word_tokenizer(WORDS, TEMPLATE_TAGS, uncondition_id=n_text + len(TEMPLATE_TAGS), first_tag_id=n_text)


def layout(testbed: str = "v2"):
    """Special ids after the text vocabulary, then the codebook; DiMOO's templates kept.
    v3's layout differs from v2's only in the codebook size (the text ids are the same)."""
    from ladr_rt.config import TokenLayout
    from ladr_rt.tiny import TEMPLATE_TAGS
    from .scenes import WORDS

    base = 2 + len(WORDS) + len(TEMPLATE_TAGS)
    uncondition = base
    mask, newline, boa, eoa, boi, eoi = range(base + 1, base + 7)
    return TokenLayout(mask=mask, newline=newline, image_offset=base + 7, boi=boi, eoi=eoi, uncondition=uncondition,
                       boa=boa, eoa=eoa, codebook=codebook(testbed), vq_scale=16)


def codebook(testbed: str = "v2") -> int:
    from . import scenes, scenes_v3

    if testbed not in TESTBEDS:
        raise ValueError(f"unknown testbed {testbed!r}; choose one of {', '.join(TESTBEDS)}")
    return scenes.CODEBOOK if testbed == "v2" else scenes_v3.CODEBOOK


def palette_v3():
    """v3's decoder: the same PaletteVQ as v2, one flat colour per code (shaded interiors, rims
    blended over their background bucket), so a v3 checkpoint's vqvae/ decodes like v2's."""
    from ladr_rt.palette import PaletteVQ
    from .scenes_v3 import code_rgb

    return PaletteVQ(code_rgb(), scale=16)


def palette():
    from ladr_rt.palette import PaletteVQ
    from .scenes import CODES, RGB, SUB

    return PaletteVQ([list(RGB["background"])] + [list(RGB[c]) for c in COLOURS], scale=16,
                     codes=[list(c) for c in CODES], sub=SUB)
