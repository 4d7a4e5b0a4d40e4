"""Does the model place the second object by the relation word when the first is already
drawn? A blue square is committed in one slot, every other image token is masked, and one
forward pass gives the model's triangle-code probability mass per slot column and row, for
"a square <relation> a triangle" with each relation. A model that knows "left of" moves the
mass to the columns right of the square; one that ignores the word gives the same split for
every relation.

    python bench/testbed/relation_probe.py      # ~10 s
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import ladr_testbed as testbed
from ladr_rt.checkpoint import load_model, load_tokenizer
from ladr_rt.config import ImageSpec
from ladr_testbed.scenes import CODE_MASK, CODES, GRID, OBJ, POSITIONS, SLOT_ORIGINS, template_codes
from ladr_rt.tokens import SequenceLayout, build_rows


def triangle_codes() -> list[int]:
    """Codes whose sub-cell pattern only the triangle template uses (its slopes)."""
    others = {int(CODE_MASK[c]) for s in ("circle", "square") for c in np.unique(template_codes(s, "red"))}
    return [i for i in range(1, len(CODES)) if int(CODE_MASK[i]) not in others]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory [default: the shipped testbed model]")
    ap.add_argument("--cfg", type=float, default=2.0)
    args = ap.parse_args(argv)
    mdir = args.model or testbed.model_dir()
    model, tok, lay = load_model(mdir), load_tokenizer(mdir), testbed.layout()
    seq = SequenceLayout(ImageSpec(GRID * 16, GRID * 16, 24), lay)
    tri = triangle_codes()
    print(f"triangle-code mass per slot column (left..right) and row (top..bottom), cfg {args.cfg:g}")
    for slot in ((1, 1), (1, 0), (1, 2), (0, 1), (2, 1)):
        r, c = SLOT_ORIGINS[slot[0]], SLOT_ORIGINS[slot[1]]
        grid = torch.full((GRID, GRID), lay.mask)  # [H, W] token ids: all masked but the square
        grid[r:r + OBJ, c:c + OBJ] = torch.from_numpy(template_codes("square", "blue")) + lay.image_offset
        for rel in POSITIONS:
            ids, key_mask = build_rows(tok, [f"a square {rel} a triangle"], seq)  # [2, L]: cond, uncond
            ids[:, seq.image_positions] = grid.ravel()
            with torch.no_grad():
                lc, lu = model(ids, key_mask, image_positions=seq.image_positions)  # [N, K] each
            p = ((1 + args.cfg) * lc - args.cfg * lu).softmax(-1)[:, tri].sum(-1).reshape(GRID, GRID)
            p[r:r + OBJ, c:c + OBJ] = 0  # the square's own slot is not a candidate
            cols = np.array([float(p[:, o:o + OBJ].sum()) for o in SLOT_ORIGINS])
            rows = np.array([float(p[o:o + OBJ, :].sum()) for o in SLOT_ORIGINS])
            print(f"square in slot {slot}, {rel:8s}: columns {np.round(cols / cols.sum(), 2)}  "
                  f"rows {np.round(rows / rows.sum(), 2)}")


if __name__ == "__main__":
    main()
