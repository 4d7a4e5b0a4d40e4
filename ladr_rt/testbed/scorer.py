"""GenEval-style scoring of a generated code grid against its prompt.

Objects are the 4-connected components of each colour; each gets a shape class from
its footprint (or none, when it is noise, a blob or a merge of two objects). A prompt
passes when every group it names is present (exactly ``count`` of them when it names
more than one; GenEval's counting rule) with the right colour where one is named, and
the groups' centroids stand in the named relation. Deterministic: no model in the loop.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .scenes import CATEGORIES, COLOURS, Spec, centroid, parse_prompt, relation_holds

MIN_CELLS = 6  # smaller components are speckle, not objects
MAX_SIDE = 8  # larger bounding boxes are blobs (the largest drawn object is 7 wide)


@dataclass(frozen=True)
class Found:
    shape: str | None
    colour: str
    centre: tuple[float, float]
    cells: int


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool [H, W] mask, as lists of (row, col)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, cells = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            cells.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(cells))
    return out


def classify(cells: np.ndarray) -> str | None:
    """Shape class from the footprint's bounding box: squares fill it, triangles widen
    downwards, circles leave the corners empty."""
    r0, c0 = cells.min(0)
    r1, c1 = cells.max(0)
    h, w = r1 - r0 + 1, c1 - c0 + 1
    if len(cells) < MIN_CELLS or max(h, w) > MAX_SIDE or min(h, w) < 3:
        return None
    box = np.zeros((h, w), bool)
    box[cells[:, 0] - r0, cells[:, 1] - c0] = True
    fill = box.mean()
    corners = int(box[0, 0]) + int(box[0, -1]) + int(box[-1, 0]) + int(box[-1, -1])
    if corners >= 3 and fill >= 0.8 and abs(h - w) <= 1:
        return "square"
    top, bottom = box[0].mean(), box[-1].mean()
    if bottom - top >= 0.4 and w > h:
        return "triangle"
    if corners <= 1 and fill >= 0.6 and abs(h - w) <= 1:
        return "circle"
    return None


def find_objects(grid: np.ndarray) -> list[Found]:
    grid = np.asarray(grid)
    out = []
    for code in range(1, 1 + len(COLOURS)):
        for cells in components(grid == code):
            if len(cells) >= MIN_CELLS:
                out.append(Found(classify(cells), COLOURS[code - 1], tuple(cells.mean(0)), len(cells)))
    return out


def passes(spec: Spec | str, grid: np.ndarray) -> bool:
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    objs = find_objects(grid)
    centres = []
    for g in spec.groups:
        match = [o for o in objs if o.shape == g.shape and (g.colour is None or o.colour == g.colour)]
        if (len(match) != g.count) if g.count > 1 else not match:
            return False
        centres.append(centroid([o.centre for o in match]))
    if len(spec.groups) == 2 and spec.relation not in (None, "and"):
        return relation_holds(spec.relation, centres[0], centres[1])
    return True


def score(specs: list[Spec], grids) -> dict:
    """{'overall': mean of the per-category means (GenEval's convention), 'categories': {...}, 'n': ...}."""
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for spec, grid in zip(specs, grids, strict=True):
        by_cat[spec.category or "other"].append(passes(spec, grid))
    cats = {c: float(np.mean(by_cat[c])) for c in CATEGORIES if c in by_cat}
    cats.update({c: float(np.mean(v)) for c, v in by_cat.items() if c not in cats})
    return {"overall": float(np.mean(list(cats.values()))) if cats else 0.0, "categories": cats,
            "n": {c: len(v) for c, v in by_cat.items()}}
