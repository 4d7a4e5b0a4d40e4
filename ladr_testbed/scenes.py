"""Synthetic compositional scenes on a token grid, and the prompts that describe them.

A scene is 1-4 objects (square, circle, triangle; six colours) on a plain background, each
a 4x4-token template in one of 3x3 slots, drawn straight into a grid of codes (code 0 =
background; the others are colour x sub-cell pattern, see ``CODES``).
A prompt is generated from a ``Spec`` (one or two groups of objects, optionally a spatial
relation), and a Spec can be parsed back from its prompt, so anything the grammar says
can be scored. Evaluation prompts are held out of training by a fixed rule
(``held_out``), so the scores measure composition, not recall.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
PLURAL = {s: s + "s" for s in SHAPES}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = {  # palette shown by the PaletteVQ decoder; background first
    "background": (238, 236, 228),
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (240, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20),
}
NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("and", "above", "below", "left of", "right of")
POSITIONS = RELATIONS[1:]
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GRID = 16  # token grid side of the shipped model (256 x 256 pixels)
MAX_OBJECTS = 4
# Every word a prompt or DiMOO's system prompt can contain: the tokenizer's vocabulary.
WORDS = tuple(
    "generate an image according to the text prompt . a two three four of and above below left right".split()
    + list(COLOURS) + list(SHAPES) + [PLURAL[s] for s in SHAPES]
)


@dataclass(frozen=True)
class Group:
    count: int
    shape: str
    colour: str | None = None  # None: the prompt names no colour (the scene picks one)

    def phrase(self) -> str:
        words = [NUMBERS[self.count]]
        if self.colour:
            words.append(self.colour)
        words.append(self.shape if self.count == 1 else PLURAL[self.shape])
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)


@dataclass(frozen=True)
class Spec:
    groups: tuple[Group, ...]
    relation: str | None = None  # between groups[0] and groups[1]
    category: str | None = field(default=None, compare=False)

    @property
    def prompt(self) -> str:
        if len(self.groups) == 1:
            return self.groups[0].phrase()
        return f"{self.groups[0].phrase()} {self.relation} {self.groups[1].phrase()}"


class PromptError(ValueError):
    pass


def _parse_group(words: list[str], text: str) -> Group:
    if len(words) not in (2, 3):
        raise PromptError(f"cannot parse {' '.join(words)!r} in prompt {text!r}: expected "
                          "'<a|two|three|four> [colour] <shape>'")
    counts = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
    if words[0] not in counts:
        raise PromptError(f"prompt {text!r}: {words[0]!r} is not a count (a, an, two, three, four)")
    count = counts[words[0]]
    colour = None
    if len(words) == 3:
        if words[1] not in COLOURS:
            raise PromptError(f"prompt {text!r}: {words[1]!r} is not a colour ({', '.join(COLOURS)})")
        colour = words[1]
    noun = words[-1]
    singular = {s: s for s in SHAPES} | {PLURAL[s]: s for s in SHAPES}
    if noun not in singular:
        raise PromptError(f"prompt {text!r}: {noun!r} is not a shape ({', '.join(SHAPES)})")
    return Group(count, singular[noun], colour)


def parse_prompt(text: str) -> Spec:
    """The inverse of ``Spec.prompt`` (case and surrounding spaces ignored)."""
    words = text.lower().replace(",", " ").split()
    for rel in ("left of", "right of", "above", "below", "and"):
        rw = rel.split()
        for i in range(1, len(words) - len(rw)):
            if words[i:i + len(rw)] == rw:
                return Spec((_parse_group(words[:i], text), _parse_group(words[i + len(rw):], text)), rel)
    return Spec((_parse_group(words, text),))


# ------------------------------------------------------------------ drawing
#
# Why slots and templates: a 0.9M-parameter model trained for under an hour on two CPU
# cores could not learn free placement at arbitrary sizes (the first testbed: two-object
# and position scores at or below chance, objects melting into one blob). Here every
# object is one fixed 4x4-token template in one of 3x3 slots, separated by a background
# line, so composition (which slots, which shape, which colour) is what the model must
# learn, and the scorer never meets touching objects in the data.
#
# Why colour x edge-pattern codes: each token is a 16x16 px tile made of 4x4 sub-cells
# (4 px each), so a code says "this colour, this sub-mask". A circle's rim and a
# triangle's slopes get codes of their own, which makes the shapes distinct in nearly
# every token (not only in the corners) and the picture smooth at 16 px per token.

SUB = 4  # sub-cells per token side
OBJ = 4  # template side in tokens
SLOT_PITCH = OBJ + 1  # one background line between slots
SLOT_ORIGINS = tuple(1 + SLOT_PITCH * i for i in range(3))  # rows/cols 1, 6, 11 of a 16 grid
SLOTS = tuple((r, c) for r in range(3) for c in range(3))


def shape_mask(shape: str) -> np.ndarray:
    """bool [OBJ*SUB, OBJ*SUB] footprint of a template at sub-cell resolution."""
    n = OBJ * SUB
    y, x = np.mgrid[:n, :n] + 0.5  # sub-cell centres
    c = n / 2
    if shape == "square":
        return np.ones((n, n), bool)
    if shape == "circle":
        return (y - c) ** 2 + (x - c) ** 2 <= c ** 2
    if shape == "triangle":  # apex up, base along the bottom edge
        return np.abs(x - c) <= y / 2 + 0.25
    raise ValueError(f"unknown shape {shape!r}")


def tile_masks(fine: np.ndarray) -> np.ndarray:
    """bool [h*SUB, w*SUB] -> int64 [h, w] 16-bit sub-masks (bit 4*i + j = sub-cell (i, j))."""
    h, w = fine.shape[0] // SUB, fine.shape[1] // SUB
    blocks = fine.reshape(h, SUB, w, SUB).transpose(0, 2, 1, 3).reshape(h, w, SUB * SUB)
    return (blocks.astype(np.int64) << np.arange(SUB * SUB)).sum(-1)


def _patterns() -> tuple[int, ...]:
    seen = {int(m) for s in SHAPES for m in tile_masks(shape_mask(s)).ravel() if m}
    full = (1 << SUB * SUB) - 1
    return (full,) + tuple(sorted(seen - {full}))


PATTERNS = _patterns()  # the non-empty sub-masks the templates use, full first
# Code 0 is background; then every colour x pattern: code 1 + i * len(PATTERNS) + j.
CODES = ((0, 0),) + tuple((1 + i, m) for i in range(len(COLOURS)) for m in PATTERNS)  # (palette idx, sub-mask)
CODEBOOK = len(CODES)
CODE_COLOUR = np.array([c for c, _ in CODES])  # int64 [CODEBOOK]: 0 = background, 1 + i = COLOURS[i]
CODE_MASK = np.array([m for _, m in CODES])  # int64 [CODEBOOK]


def _pattern_index(shape: str) -> np.ndarray:
    """int64 [OBJ, OBJ]: each tile's index in PATTERNS, -1 for an empty tile."""
    masks = tile_masks(shape_mask(shape))
    j = np.searchsorted(np.array(PATTERNS[1:]), masks)  # index among the sorted partial patterns
    return np.where(masks == 0, -1, np.where(masks == PATTERNS[0], 0, j + 1))


_PATTERN_INDEX = {s: _pattern_index(s) for s in SHAPES}  # rasterised once, not per drawn scene


def template_codes(shape: str, colour: str) -> np.ndarray:
    """int64 [OBJ, OBJ] codes of one object (a new array)."""
    idx = _PATTERN_INDEX[shape]
    return np.where(idx < 0, 0, 1 + COLOURS.index(colour) * len(PATTERNS) + idx)


def fine_mask(codes: np.ndarray) -> np.ndarray:
    """int64 [h, w] codes -> bool [h*SUB, w*SUB] foreground at sub-cell resolution."""
    m = CODE_MASK[np.asarray(codes)]
    bits = (m[..., None] >> np.arange(SUB * SUB)) & 1  # [h, w, SUB*SUB]
    h, w = m.shape
    return bits.reshape(h, w, SUB, SUB).transpose(0, 2, 1, 3).reshape(h * SUB, w * SUB).astype(bool)


@dataclass(frozen=True)
class Placed:
    shape: str
    colour: str
    slot: tuple[int, int]  # (slot row, slot col) in the 3x3 layout

    @property
    def top(self) -> int:
        return SLOT_ORIGINS[self.slot[0]]

    @property
    def left(self) -> int:
        return SLOT_ORIGINS[self.slot[1]]

    @property
    def centre(self) -> tuple[float, float]:
        return self.top + (OBJ - 1) / 2, self.left + (OBJ - 1) / 2


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = 1.0) -> bool:
    """Centre a relative to centre b, in (row, col) grid units."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    return {"above": dy <= -margin, "below": dy >= margin, "left of": dx <= -margin,
            "right of": dx >= margin}.get(rel, True)


def centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points]))


def sample_scene(spec: Spec, rng: np.random.Generator, tries: int = 500) -> list[Placed]:
    """Objects in distinct random slots; a spatial relation holds between the groups'
    centroids with a margin of 2 cells (so a drawn scene is never borderline for the scorer)."""
    colours = [g.colour or COLOURS[rng.integers(len(COLOURS))] for g in spec.groups]
    n = sum(g.count for g in spec.groups)
    for _ in range(tries):
        slots = [SLOTS[i] for i in rng.choice(len(SLOTS), size=n, replace=False)]
        placed, k = [], 0
        for g, colour in zip(spec.groups, colours):
            placed.append([Placed(g.shape, colour, slots[k + i]) for i in range(g.count)])
            k += g.count
        if not relation_placed(spec, placed):
            continue
        return [o for objs in placed for o in objs]
    raise RuntimeError(f"could not place {spec.prompt!r} in the 3x3 slots")


def relation_placed(spec: Spec, placed: list[list]) -> bool:
    """A two-group scene that names a position has its groups' centroids that way round (with
    a margin, so the scorer's reading is unambiguous); any other scene passes."""
    if len(placed) == 2 and spec.relation in POSITIONS:
        ca = centroid([o.centre for o in placed[0]])
        cb = centroid([o.centre for o in placed[1]])
        return relation_holds(spec.relation, ca, cb, margin=2.0)
    return True


def render(objects: list[Placed]) -> np.ndarray:
    """int64 [GRID, GRID] codes."""
    out = np.zeros((GRID, GRID), np.int64)
    for o in objects:
        out[o.top: o.top + OBJ, o.left: o.left + OBJ] = template_codes(o.shape, o.colour)
    return out


# ------------------------------------------------------------------ prompt sets

def category_specs(category: str) -> list[Spec]:
    """Every distinct prompt of one GenEval-style category, in a fixed order."""
    out: list[Spec] = []
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if category == "single_object":
        out = [Spec((Group(1, s),)) for s in SHAPES]
    elif category == "two_object":
        out = [Spec((Group(1, a), Group(1, b)), "and") for a, b in pairs]
    elif category == "counting":
        out = [Spec((Group(n, s),)) for s in SHAPES for n in (2, 3, 4)]
    elif category == "colors":
        out = [Spec((Group(1, s, c),)) for s in SHAPES for c in COLOURS]
    elif category == "position":
        out = [Spec((Group(1, a), Group(1, b)), r) for a, b in pairs for r in POSITIONS]
    elif category == "color_attr":
        out = [Spec((Group(1, a, ca), Group(1, b, cb)), "and") for a, b in pairs
               for ca in COLOURS for cb in COLOURS if ca != cb]
    else:
        raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    return [Spec(s.groups, s.relation, category) for s in out]


def _rank(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


HELD_OUT_FRACTION = 1 / 6


def held_out_specs(category: str) -> list[Spec]:
    """The category's evaluation prompts: a fixed sixth (at least one), chosen by hash."""
    specs = sorted(category_specs(category), key=lambda s: _rank(s.prompt))
    return specs[: max(1, math.ceil(len(specs) * HELD_OUT_FRACTION))]


HELD_OUT_PROMPTS = frozenset(s.prompt for c in CATEGORIES for s in held_out_specs(c))


def held_out(prompt: str) -> bool:
    return prompt in HELD_OUT_PROMPTS


def eval_items(per_category: int = 8) -> list[Spec]:
    """``per_category`` held-out prompts per category (cycled when fewer exist), in a fixed order."""
    items = []
    for c in CATEGORIES:
        specs = held_out_specs(c)
        items += [specs[i % len(specs)] for i in range(per_category)]
    return items


P_RELATION = 0.6  # share of two-group training scenes that name a spatial relation (train.py --p-relation)
P_COLOUR_PAIR = 0.6  # share of groups in two-group training scenes whose colour is named (--p-colour-pair)


def sample_train_spec(rng: np.random.Generator, p_relation: float = P_RELATION,
                      p_colour_pair: float = P_COLOUR_PAIR) -> Spec:
    """The training distribution: one or two groups, counts up to four objects in all,
    colours named or not, 'and' or (with probability ``p_relation``) a spatial relation.
    Held-out prompts are redrawn."""
    while True:
        # Counting scenes (one group of 2-4) are a third of the data: over-counting under
        # guidance was the weakest category of the first models (see TRAINING.md).
        if rng.random() < 0.45:
            n = 1 if rng.random() < 0.25 else int(rng.integers(2, 5))
            g = Group(n, SHAPES[rng.integers(3)], COLOURS[rng.integers(6)] if rng.random() < 0.6 else None)
            spec = Spec((g,))
        else:
            a, b = rng.choice(3, size=2, replace=False)
            n1 = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
            n2 = 1 if rng.random() < 0.7 else int(rng.integers(2, MAX_OBJECTS - n1 + 1)) if n1 < 3 else 1
            ga = Group(n1, SHAPES[a], COLOURS[rng.integers(6)] if rng.random() < p_colour_pair else None)
            gb = Group(n2, SHAPES[b], COLOURS[rng.integers(6)] if rng.random() < p_colour_pair else None)
            rel = "and" if rng.random() < 1 - p_relation else POSITIONS[rng.integers(4)]
            spec = Spec((ga, gb), rel)
        if not held_out(spec.prompt):
            return spec
