"""GenEval-style scoring of a generated code grid against its prompt.

Objects are the 4-connected components of each colour (any code of that colour); each
gets a shape class from its sub-cell footprint (or none, when it is noise, a blob, a
broken shape or a merge of two objects). A prompt
passes when every group it names is present (exactly ``count`` of them when it names
more than one; GenEval's counting rule) with the right colour where one is named, and
the groups' centroids stand in the named relation. Deterministic: no model in the loop.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .scenes import (CATEGORIES, CODE_COLOUR, COLOURS, OBJ, SHAPES, Spec, centroid, fine_mask, parse_prompt,
                     relation_holds, shape_mask)

MIN_CELLS = 3  # smaller components are speckle, not objects
MIN_IOU = 0.85  # sub-cell IoU with the best template; square-vs-circle is 0.79, so a shape must be clean


@dataclass(frozen=True)
class Found:
    shape: str | None
    colour: str
    centre: tuple[float, float]
    cells: int


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool [H, W] mask, as int arrays [n, 2] of (row, col)."""
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


TEMPLATES = {s: shape_mask(s) for s in SHAPES}  # bool [OBJ*SUB, OBJ*SUB] each


def classify(cells: np.ndarray, grid: np.ndarray) -> str | None:
    """Shape class of one component: its token bounding box must be a template's (OBJ x OBJ;
    bigger is a merge or a blob), and its sub-cell footprint must match that template with
    IoU >= MIN_IOU. Matching the footprint, not the codes, so any code of the right colour
    and sub-mask counts, wherever the object stands."""
    r0, c0 = cells.min(0)
    r1, c1 = cells.max(0)
    if len(cells) < MIN_CELLS or (r1 - r0 + 1, c1 - c0 + 1) != (OBJ, OBJ):
        return None
    own = np.zeros((OBJ, OBJ), np.int64)  # the component's codes only: a neighbour's tokens are not its own
    own[cells[:, 0] - r0, cells[:, 1] - c0] = np.asarray(grid)[cells[:, 0], cells[:, 1]]
    fine = fine_mask(own)
    best, best_iou = None, 0.0
    for shape, t in TEMPLATES.items():
        iou = (fine & t).sum() / (fine | t).sum()
        if iou > best_iou:
            best, best_iou = shape, iou
    return best if best_iou >= MIN_IOU else None


def find_objects(grid: np.ndarray, code_colour: np.ndarray | None = None, classify_fn=None) -> list[Found]:
    """``code_colour`` (code -> colour index, 0 = background) and ``classify_fn`` default to v2's;
    scorer_v3 passes its own."""
    grid = np.asarray(grid)
    colour = (CODE_COLOUR if code_colour is None else code_colour)[grid]  # [H, W] 0 = background
    classify_fn = classify if classify_fn is None else classify_fn
    out = []
    for k in range(1, 1 + len(COLOURS)):
        for cells in components(colour == k):
            if len(cells) >= MIN_CELLS:
                out.append(Found(classify_fn(cells, grid), COLOURS[k - 1], tuple(cells.mean(0)), len(cells)))
    return out


def passes(spec: Spec | str, grid: np.ndarray, find=None) -> bool:
    """``find``: grid -> objects (default: v2's ``find_objects``; scorer_v3 passes its own)."""
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    objs = (find or find_objects)(grid)
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
