"""Synthetic compositional scenes on a token grid, and the prompts that describe them.

A scene is 1-4 flat-coloured objects (square, circle, triangle) on a plain background,
drawn straight into a grid of palette codes (code 0 = background, code 1 + i = COLOURS[i]).
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
CODEBOOK = 1 + len(COLOURS)
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

def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool [h, w] footprint. Triangles point up, height ``size``, base 2*size - 1."""
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        c = (size - 1) / 2
        y, x = np.mgrid[:size, :size]
        return (y - c) ** 2 + (x - c) ** 2 <= (size / 2) ** 2 + 0.3
    if shape == "triangle":
        w = 2 * size - 1
        m = np.zeros((size, w), bool)
        for r in range(size):
            m[r, size - 1 - r: size + r] = True
        return m
    raise ValueError(f"unknown shape {shape!r}")


SIZES = {"square": (4, 5), "circle": (5, 6), "triangle": (3, 4)}


@dataclass(frozen=True)
class Placed:
    shape: str
    colour: str
    top: int
    left: int
    mask: np.ndarray = field(compare=False, repr=False)

    @property
    def centre(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return self.top + ys.mean(), self.left + xs.mean()


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = 1.0) -> bool:
    """Centre a relative to centre b, in (row, col) grid units."""
    dy, dx = a[0] - b[0], a[1] - b[1]
    return {"above": dy <= -margin, "below": dy >= margin, "left of": dx <= -margin,
            "right of": dx >= margin}.get(rel, True)


def centroid(points: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points]))


def sample_scene(spec: Spec, rng: np.random.Generator, grid: int = GRID, tries: int = 200) -> list[Placed]:
    """Objects placed at random, one background cell apart, satisfying the spec's relation
    with a margin of 2 cells (so a drawn scene is never borderline for the scorer)."""
    colours = [g.colour or COLOURS[rng.integers(len(COLOURS))] for g in spec.groups]
    for _ in range(tries):
        occupied = np.zeros((grid, grid), bool)
        placed: list[list[Placed]] = []
        ok = True
        for g, colour in zip(spec.groups, colours):
            objs = []
            for _ in range(g.count):
                m = shape_mask(g.shape, int(rng.choice(SIZES[g.shape])))
                h, w = m.shape
                for _ in range(50):
                    top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
                    # dilate by one cell so distinct objects never touch (even diagonally)
                    t0, l0 = max(top - 1, 0), max(left - 1, 0)
                    if not occupied[t0: top + h + 1, l0: left + w + 1].any():
                        occupied[top: top + h, left: left + w] |= m
                        objs.append(Placed(g.shape, colour, top, left, m))
                        break
                else:
                    ok = False
                    break
            if not ok:
                break
            placed.append(objs)
        if ok and len(placed) == 2 and spec.relation in POSITIONS:
            ca = centroid([o.centre for o in placed[0]])
            cb = centroid([o.centre for o in placed[1]])
            ok = relation_holds(spec.relation, ca, cb, margin=2.0)
        if ok:
            return [o for objs in placed for o in objs]
    raise RuntimeError(f"could not place {spec.prompt!r} on a {grid}x{grid} grid")


def render(objects: list[Placed], grid: int = GRID) -> np.ndarray:
    """int64 [grid, grid] palette codes."""
    out = np.zeros((grid, grid), np.int64)
    for o in objects:
        h, w = o.mask.shape
        region = out[o.top: o.top + h, o.left: o.left + w]
        region[o.mask] = 1 + COLOURS.index(o.colour)
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


def sample_train_spec(rng: np.random.Generator) -> Spec:
    """The training distribution: one or two groups, counts up to four objects in all,
    colours named or not, 'and' or a spatial relation. Held-out prompts are redrawn."""
    while True:
        if rng.random() < 0.4:
            n = 1 if rng.random() < 0.4 else int(rng.integers(2, 5))
            g = Group(n, SHAPES[rng.integers(3)], COLOURS[rng.integers(6)] if rng.random() < 0.6 else None)
            spec = Spec((g,))
        else:
            a, b = rng.choice(3, size=2, replace=False)
            n1 = 1 if rng.random() < 0.6 else int(rng.integers(2, 4))
            n2 = 1 if rng.random() < 0.7 else int(rng.integers(2, MAX_OBJECTS - n1 + 1)) if n1 < 3 else 1
            ga = Group(n1, SHAPES[a], COLOURS[rng.integers(6)] if rng.random() < 0.6 else None)
            gb = Group(n2, SHAPES[b], COLOURS[rng.integers(6)] if rng.random() < 0.6 else None)
            rel = "and" if rng.random() < 0.4 else POSITIONS[rng.integers(4)]
            spec = Spec((ga, gb), rel)
        if not held_out(spec.prompt):
            return spec
