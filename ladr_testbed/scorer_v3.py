"""Scorer v3 (issue 16): v2's GenEval-style categories on ``scenes_v3`` grids, plus two
measures that catch sampler faults directly.

* Categories: objects are the 4-connected components of each colour (interior and rim codes
  of that colour). A component's shape is the (shape, size) template whose coverage map
  (interior 1, rim 1/4, 1/2, 3/4) matches its own with soft IoU (sum of minima over sum of
  maxima) >= MIN_IOU, on the same bounding box. GenEval's rules as in v2 (``scorer.passes``).
* Colour coherence: the share of foreground (object) tokens that lie in a single-colour
  4-connected foreground component of at least MIN_OBJECT tokens. Drawn objects never touch
  (scenes_v3.GAP), so a mosaic (an object whose tokens were sampled in several colours) and
  speckle (object tokens strewn over the background) both lower it; an image without
  foreground scores 1 (nothing incoherent; the categories catch the missing objects).
* Background continuity: the share of background tokens with a background 4-neighbour whose
  every background 4-neighbour is within scenes_v3.MAX_STEP levels: the field's own
  smoothness, which drawn scenes always meet, and a background sampled token by token does not.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .scenes import CATEGORIES, SHAPES, Spec
from .scenes_v3 import CODE_COLOUR, CODE_COVERAGE, CODE_KIND, CODE_LEVEL, COVER, KIND_BG, MAX_STEP
from .scorer import Found, components, passes
from .scorer import find_objects as _find_objects

MIN_IOU = 0.85  # the shapes' own maps overlap at most 0.74 (scenes_v3.coverage), a drawn object matches at 1
MIN_OBJECT = 6  # foreground tokens; the smallest drawn object (a size-4 circle) has 12 + 4 rims


def classify(cells: np.ndarray, grid: np.ndarray) -> str | None:
    r0, c0 = cells.min(0)
    r1, c1 = cells.max(0)
    h, w = r1 - r0 + 1, c1 - c0 + 1
    own = np.zeros((h, w))
    own[cells[:, 0] - r0, cells[:, 1] - c0] = CODE_COVERAGE[np.asarray(grid)[cells[:, 0], cells[:, 1]]]
    best, best_iou = None, 0.0
    for (shape, size), t in COVER.items():
        rows, cols = np.nonzero(t)
        t = t[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]  # the template's own bounding box
        if t.shape != (h, w):
            continue
        iou = np.minimum(own, t).sum() / np.maximum(own, t).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best if best_iou >= MIN_IOU else None


def find_objects(grid: np.ndarray) -> list[Found]:
    return _find_objects(grid, CODE_COLOUR, classify)


def colour_coherence(grid: np.ndarray) -> float:
    grid = np.asarray(grid)
    colour = CODE_COLOUR[grid]
    fg = colour > 0
    n = int(fg.sum())
    if n == 0:
        return 1.0
    good = 0
    for cells in components(fg):
        if len(cells) >= MIN_OBJECT and len(np.unique(colour[cells[:, 0], cells[:, 1]])) == 1:
            good += len(cells)
    return good / n


def mosaics(grid: np.ndarray) -> int:
    """Foreground components of at least MIN_OBJECT tokens that hold more than one colour."""
    colour = CODE_COLOUR[np.asarray(grid)]
    return sum(len(cells) >= MIN_OBJECT and len(np.unique(colour[cells[:, 0], cells[:, 1]])) > 1
               for cells in components(colour > 0))


def _continuity_maps(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bool [H, W] twice: background tokens with a background 4-neighbour, and those of them
    with a background 4-neighbour more than MAX_STEP levels away (a break in the field)."""
    grid = np.asarray(grid)
    bg = CODE_KIND[grid] == KIND_BG
    level = CODE_LEVEL[grid].astype(np.int64)
    H, W = grid.shape
    has_nb = np.zeros_like(bg)
    smooth = bg.copy()
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nb = np.zeros_like(bg)
        diff = np.zeros(grid.shape, np.int64)
        rs, rd = slice(max(dr, 0), H + min(dr, 0)), slice(max(-dr, 0), H + min(-dr, 0))
        cs, cd = slice(max(dc, 0), W + min(dc, 0)), slice(max(-dc, 0), W + min(-dc, 0))
        nb[rd, cd] = bg[rs, cs]  # nb[r, c] = bg[r + dr, c + dc]
        diff[rd, cd] = np.abs(level[rs, cs] - level[rd, cd])
        pair = bg & nb
        has_nb |= pair
        smooth &= ~pair | (diff <= MAX_STEP)
    return bg & has_nb, bg & has_nb & ~smooth


def background_breaks(grid: np.ndarray) -> np.ndarray:
    """bool [H, W]: background tokens that break the field's smoothness (drawn scenes: none)."""
    return _continuity_maps(grid)[1]


def background_continuity(grid: np.ndarray) -> float:
    counted, breaks = _continuity_maps(grid)
    n = int(counted.sum())
    return 1.0 if n == 0 else 1.0 - float(breaks.sum()) / n


def incoherent_tokens(grid: np.ndarray, code_colour: np.ndarray = CODE_COLOUR, min_size: int = MIN_OBJECT) -> np.ndarray:
    """bool [H, W]: object tokens that are speckle (their 4-connected foreground component has
    fewer than ``min_size`` tokens) or off-colour (not the component's majority colour): the
    tokens a mosaic or speckle consists of. Drawn scenes have none. ``code_colour`` and
    ``min_size`` default to v3's; v2's are scenes.CODE_COLOUR and scorer.MIN_CELLS."""
    colour = code_colour[np.asarray(grid)]
    out = np.zeros(colour.shape, bool)
    for cells in components(colour > 0):
        cc = colour[cells[:, 0], cells[:, 1]]
        if len(cells) < min_size:
            out[cells[:, 0], cells[:, 1]] = True
        else:
            out[cells[:, 0], cells[:, 1]] = cc != np.bincount(cc).argmax()
    return out


def passes_v3(spec: Spec | str, grid: np.ndarray) -> bool:
    return passes(spec, grid, find=find_objects)


def score(specs: list[Spec], grids) -> dict:
    """v2's {'overall', 'categories', 'n'} on v3 grids, plus the means of 'coherence' and
    'continuity' and the mean number of 'mosaics' per image."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    coh, cont, mos = [], [], []
    for spec, grid in zip(specs, grids, strict=True):
        by_cat[spec.category or "other"].append(passes_v3(spec, grid))
        coh.append(colour_coherence(grid))
        cont.append(background_continuity(grid))
        mos.append(mosaics(grid))
    cats = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if c in by_cat}
    cats.update({c: float(np.mean(v)) for c, v in by_cat.items() if c not in cats})
    return {"overall": float(np.mean(list(cats.values()))) if cats else 0.0, "categories": cats,
            "n": {c: len(v) for c, v in by_cat.items()}, "coherence": float(np.mean(coh)) if coh else 0.0,
            "continuity": float(np.mean(cont)) if cont else 0.0, "mosaics": float(np.mean(mos)) if mos else 0.0}


__all__ = ["find_objects", "classify", "colour_coherence", "mosaics", "background_continuity", "background_breaks",
           "incoherent_tokens", "passes_v3", "score", "SHAPES"]
