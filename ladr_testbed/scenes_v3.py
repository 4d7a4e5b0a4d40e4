"""Testbed v3 scenes (issue 16): the same prompts as v2, drawn with token statistics closer to
VQ tokens of natural images, so that a token's neighbours being known does not make it free.

v2's grid is one background code plus flat templates: a token with decoded neighbours is
almost always exactly predictable, which is what made LADR's rescue commit ~0-nat tokens. Here

* the background is a smooth random field (a gradient plus low-frequency waves, lightly
  dithered) quantised to ``BG_LEVELS`` levels, so 4-neighbours differ by at most one level and a
  token is only known to within a level or two from its neighbours;
* object interiors are shaded (``SHADES`` levels along a random light direction, dithered);
* object rims are anti-aliased: a rim code is (colour, coverage 1/4, 1/2 or 3/4, the background
  level under it to ``BG_BUCKETS`` buckets), so rims carry both the shape and the background;
* objects come in several sizes (``SIZES`` tokens) and may stand anywhere (``layout="free"``), or
  in v2's 3x3 slots with background lines between them (``layout="slots"``: the cheap control
  of the issue, same 16x16 grid and sequence length as v2).

Prompts, categories and the held-out split are v2's (``scenes.py``), unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, OBJ, RGB, SHAPES, SLOT_ORIGINS, SLOTS, Spec, relation_placed

GRID = 16  # token grid side (v2's; 24 is supported by the drawing code: ``grid=``)
LAYOUTS = ("free", "slots")
SIZES = (4, 5, 6)  # object side in tokens (free layout); the slots layout uses OBJ = 4
GAP = 1  # tokens of background at least between two objects' boxes: the scorer never meets touching objects
BG_LEVELS = 48
SHADES = 8
COVERAGES = (0.25, 0.5, 0.75)  # rim coverage classes
BG_BUCKETS = 8  # a rim code knows the background level under it to BG_LEVELS / BG_BUCKETS levels
INTERIOR_FROM, RIM_FROM = 0.875, 0.125  # coverage at or above: interior; below RIM_FROM: background
SUPER = 8  # supersampling per token side for coverage
# Largest step of the background field between 4-neighbours before dithering, and the dither's
# half-width: rounding adds less than one level, so 1.05 + 2 * 0.45 < 2 keeps every quantised
# neighbour pair within MAX_STEP levels (the smoothness scorer_v3.background_continuity tests),
# while typical neighbours differ by about one level.
FIELD_SLOPE = 1.05
GRADIENT = (0.55, 0.8)  # levels per token along the gradient's direction
WAVE_STEP = 0.25
DITHER = 0.45
MAX_STEP = 2
SHADE_DITHER = 0.45

# ------------------------------------------------------------------ codebook
#
#   [0, BG_LEVELS)                 background level l
#   [BG0, BG0 + 6 * SHADES)        interior: colour i, shade s   -> INTERIOR0 + i * SHADES + s
#   [RIM0, RIM0 + 6 * 3 * BUCKETS) rim: colour i, coverage j, bg bucket b -> RIM0 + (i * 3 + j) * BG_BUCKETS + b
INTERIOR0 = BG_LEVELS
RIM0 = INTERIOR0 + len(COLOURS) * SHADES
CODEBOOK = RIM0 + len(COLOURS) * len(COVERAGES) * BG_BUCKETS
BUCKET_WIDTH = BG_LEVELS // BG_BUCKETS

KIND_BG, KIND_INTERIOR, KIND_RIM = 0, 1, 2
_k = np.arange(CODEBOOK)
_rim = np.clip(_k - RIM0, 0, None)
CODE_KIND = np.where(_k < INTERIOR0, KIND_BG, np.where(_k < RIM0, KIND_INTERIOR, KIND_RIM))
CODE_COLOUR = np.where(CODE_KIND == KIND_BG, 0,  # 0 = background, 1 + i = COLOURS[i], as v2's CODE_COLOUR
                       1 + np.where(CODE_KIND == KIND_INTERIOR, (_k - INTERIOR0) // SHADES,
                                    _rim // (len(COVERAGES) * BG_BUCKETS)))
CODE_COVERAGE = np.where(CODE_KIND == KIND_BG, 0.0, np.where(
    CODE_KIND == KIND_INTERIOR, 1.0, np.array(COVERAGES)[(_rim // BG_BUCKETS) % len(COVERAGES)]))
CODE_LEVEL = np.where(CODE_KIND == KIND_BG, _k, -1)  # background level; -1 for object codes
CODE_SHADE = np.where(CODE_KIND == KIND_INTERIOR, (_k - INTERIOR0) % SHADES, -1)
CODE_BUCKET = np.where(CODE_KIND == KIND_RIM, _rim % BG_BUCKETS, -1)

BG_DARK, BG_LIGHT = (150, 158, 166), (240, 236, 224)  # slate to cream: no object colour lies on this ramp


def background_rgb(level: float) -> np.ndarray:
    t = float(level) / (BG_LEVELS - 1)
    return (1 - t) * np.array(BG_DARK, float) + t * np.array(BG_LIGHT, float)


def shade_rgb(colour: int, shade: float) -> np.ndarray:
    """Colour index i (0-based), shade 0 (dark) .. SHADES - 1 (light)."""
    base = np.array(RGB[COLOURS[colour]], float)
    f = 0.72 + 0.5 * shade / (SHADES - 1)  # 0.72 .. 1.22
    return np.clip(base * f if f <= 1 else base + (255 - base) * (f - 1) * 0.8, 0, 255)


def code_rgb() -> list[list[int]]:
    """[CODEBOOK][3] flat colour per code, for the palette decoder (``testbed.palette_v3``)."""
    out = []
    for k in range(CODEBOOK):
        kind, c = CODE_KIND[k], CODE_COLOUR[k] - 1
        if kind == KIND_BG:
            rgb = background_rgb(k)
        elif kind == KIND_INTERIOR:
            rgb = shade_rgb(c, CODE_SHADE[k])
        else:  # anti-aliased: the object's middle shade over the bucket's middle background level
            a = CODE_COVERAGE[k]
            bg = background_rgb((CODE_BUCKET[k] + 0.5) * BUCKET_WIDTH)
            rgb = a * shade_rgb(c, (SHADES - 1) / 2) + (1 - a) * bg
        out.append([int(round(v)) for v in rgb])
    return out


def interior_code(colour: int, shade: int) -> int:
    return INTERIOR0 + colour * SHADES + shade


def rim_code(colour: int, coverage: float, bg_level: int) -> int:
    j = int(np.argmin([abs(coverage - c) for c in COVERAGES]))
    return RIM0 + (colour * len(COVERAGES) + j) * BG_BUCKETS + min(BG_BUCKETS - 1, bg_level // BUCKET_WIDTH)


# ------------------------------------------------------------------ shapes

def coverage(shape: str, size: int) -> np.ndarray:
    """float [size, size]: share of each token the shape covers, quantised to 0, the rim classes or 1.

    The outline is inset from the box (a square by 0.15 token, a circle by 0.2, a triangle by 0.1),
    so every shape has rim tokens; the insets keep the three shapes' coverage maps apart (IoU at
    most 0.74 between shapes of one size) while the scorer asks 0.85 of a match."""
    n = size * SUPER
    y, x = (np.mgrid[:n, :n] + 0.5) / SUPER  # supersample centres, in tokens
    c = size / 2
    if shape == "square":
        inset = 0.15
        fine = (np.abs(x - c) <= c - inset) & (np.abs(y - c) <= c - inset)
    elif shape == "circle":
        fine = (y - c) ** 2 + (x - c) ** 2 <= (c - 0.2) ** 2
    elif shape == "triangle":  # apex up, base along the bottom edge
        top, bottom = 0.1, size - 0.2
        fine = (y >= top) & (y <= bottom) & (np.abs(x - c) <= (y - top) / (bottom - top) * (c - 0.1))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cov = fine.reshape(size, SUPER, size, SUPER).mean((1, 3))
    return quantise_coverage(cov)


def quantise_coverage(cov: np.ndarray) -> np.ndarray:
    rim = np.array(COVERAGES)[np.abs(cov[..., None] - np.array(COVERAGES)).argmin(-1)]
    return np.where(cov >= INTERIOR_FROM, 1.0, np.where(cov < RIM_FROM, 0.0, rim))


COVER = {(s, n): coverage(s, n) for s in SHAPES for n in sorted(set(SIZES) | {OBJ})}


# ------------------------------------------------------------------ drawing

@dataclass(frozen=True)
class Placed:
    shape: str
    colour: str
    top: int
    left: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.top + (self.size - 1) / 2, self.left + (self.size - 1) / 2


def background_field(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """int64 [H, W] background levels: a gradient of GRADIENT levels per token in a random
    direction plus 2-3 low-frequency waves (their steepest step WAVE_STEP at most), dithered,
    quantised to [0, BG_LEVELS). The gradient dominates so that the field spans 10-25 levels:
    a background shuffled or sampled token by token then breaks the smoothness."""
    y, x = np.mgrid[:H, :W].astype(float)
    th = rng.uniform(0, 2 * math.pi)
    f = rng.uniform(*GRADIENT) * (np.cos(th) * x + np.sin(th) * y)
    waves = np.zeros_like(f)
    for _ in range(int(rng.integers(2, 4))):
        fy, fx = rng.uniform(-1.5, 1.5, 2) / max(H, W)  # cycles per token: at most 1.5 across the grid
        waves += rng.uniform(0.5, 1.0) * np.sin(2 * math.pi * (fx * x + fy * y) + rng.uniform(0, 2 * math.pi))
    wstep = max(np.abs(np.diff(waves, axis=0)).max(), np.abs(np.diff(waves, axis=1)).max(), 1e-9)
    f = f + waves * (WAVE_STEP / wstep)
    step = max(np.abs(np.diff(f, axis=0)).max(), np.abs(np.diff(f, axis=1)).max())
    if step > FIELD_SLOPE:
        f = f * (FIELD_SLOPE / step)
    span = f.max() - f.min()
    if span > BG_LEVELS - 2:
        f = f * ((BG_LEVELS - 2) / span)
        span = BG_LEVELS - 2
    f = f - f.min() + 0.5 + rng.uniform(0, BG_LEVELS - 2 - span)
    f = f + rng.uniform(-DITHER, DITHER, f.shape)
    return np.clip(np.round(f), 0, BG_LEVELS - 1).astype(np.int64)


def draw_object(grid: np.ndarray, levels: np.ndarray, o: Placed, rng: np.random.Generator) -> None:
    """Writes o into grid (codes) in place; levels is the background field under it."""
    cov = COVER[(o.shape, o.size)]
    ci = COLOURS.index(o.colour)
    th = rng.uniform(0, 2 * math.pi)
    base = rng.uniform(2.0, SHADES - 3.0)
    gain = 2.5 / o.size  # about 2.5 shade levels across the object
    for i in range(o.size):
        for j in range(o.size):
            r, c = o.top + i, o.left + j
            a = cov[i, j]
            if a == 1.0:
                s = base + gain * ((j - o.size / 2) * math.cos(th) + (i - o.size / 2) * math.sin(th))
                s += rng.uniform(-SHADE_DITHER, SHADE_DITHER)
                grid[r, c] = interior_code(ci, int(np.clip(round(s), 0, SHADES - 1)))
            elif a > 0:
                grid[r, c] = rim_code(ci, a, int(levels[r, c]))


def render(objects: list[Placed], rng: np.random.Generator, grid: int = GRID) -> np.ndarray:
    """int64 [grid, grid] codes: a fresh background field, then the objects."""
    levels = background_field(rng, grid, grid)
    out = levels.copy()
    for o in objects:
        draw_object(out, levels, o, rng)
    return out


def _separated(a: Placed, b: Placed) -> bool:
    return (a.top + a.size + GAP <= b.top or b.top + b.size + GAP <= a.top or
            a.left + a.size + GAP <= b.left or b.left + b.size + GAP <= a.left)


def sample_scene(spec: Spec, rng: np.random.Generator, layout: str = "free", grid: int = GRID,
                 tries: int = 2000) -> list[Placed]:
    """Objects for ``spec``: in distinct random slots (``slots``, v2's layout) or anywhere with
    GAP tokens between boxes (``free``); a spatial relation holds between the groups' centroids
    with a margin of 2 tokens, as in v2, so a drawn scene is never borderline for the scorer."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "slots" and grid != GRID:
        raise ValueError(f"the slots layout is v2's {GRID}x{GRID} grid; use layout='free' for grid {grid}")
    colours = [g.colour or COLOURS[rng.integers(len(COLOURS))] for g in spec.groups]
    n = sum(g.count for g in spec.groups)
    for _ in range(tries):
        boxes: list[tuple[int, int, int]] = []
        if layout == "slots":
            for k in rng.choice(len(SLOTS), size=n, replace=False):
                sr, sc = SLOTS[k]
                boxes.append((SLOT_ORIGINS[sr], SLOT_ORIGINS[sc], OBJ))
        else:
            # several objects crowd the grid: a bigger object is likelier in a sparse scene
            sizes = SIZES if n <= 2 else SIZES[:2] if n == 3 else SIZES[:1]
            placed_ok = True
            for _k in range(n):
                for _t in range(50):
                    s = int(rng.choice(sizes))
                    b = Placed("", "", int(rng.integers(0, grid - s + 1)), int(rng.integers(0, grid - s + 1)), s)
                    if all(_separated(b, Placed("", "", *o)) for o in boxes):
                        boxes.append((b.top, b.left, s))
                        break
                else:
                    placed_ok = False
                    break
            if not placed_ok:
                continue
        placed, k = [], 0
        for g, colour in zip(spec.groups, colours):
            placed.append([Placed(g.shape, colour, *boxes[k + i]) for i in range(g.count)])
            k += g.count
        if not relation_placed(spec, placed):
            continue
        return [o for objs in placed for o in objs]
    raise RuntimeError(f"could not place {spec.prompt!r} ({layout} layout, grid {grid})")


def draw(spec: Spec, rng: np.random.Generator, layout: str = "free", grid: int = GRID) -> np.ndarray:
    """int64 [grid, grid] codes of one scene for ``spec``."""
    return render(sample_scene(spec, rng, layout, grid), rng, grid)
