"""How predictable is a token from its 3x3 neighbourhood? v2 against v3 training data (issue 16).

    python bench/testbed/token_stats.py                      # ~1 min on one core; prints the table
    python bench/testbed/token_stats.py --json bench/testbed/token_stats.json

The premise of LADR is that a token next to decoded ones is cheap to commit but not free: on
natural-image VQ tokens the neighbours narrow a token down without determining it. This measures
that premise on drawn training scenes (``sample_train_spec``, not the model), per testbed:

* ``H(X|N8)``: conditional entropy (bits) of a token given its 8 neighbours (positions off the
  grid are a border symbol), plug-in estimate. A plug-in estimate is biased low when contexts are
  rare, so it is reported at two sample sizes (rising with the sample: still biased) together with
  ``H(X|N4)`` given the 4 edge neighbours only, which is an upper bound on the true H(X|N8) and
  better sampled. The truth lies between the larger-sample H(X|N8) and H(X|N4), roughly.
* ``predictable``: the share of tokens whose 8-neighbour context was seen at least ``--min-seen``
  times and always with this same code: exactly predictable from the neighbours. ``rare``: the
  share in contexts seen fewer times (undecided by this sample).
* the same two numbers for background and object tokens apart, and the code-usage histogram:
  codes used, the most common code's share, effective codes 2^H(X), and the top-10 shares.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ladr_testbed import TESTBEDS, codebook
from ladr_testbed import scenes, scenes_v3
from ladr_testbed.scenes import sample_train_spec


def draw(testbed: str, spec, rng) -> np.ndarray:
    if testbed == "v2":
        return scenes.render(scenes.sample_scene(spec, rng))
    return scenes_v3.draw(spec, rng, "slots" if testbed == "v3-slots" else "free")


def is_background(testbed: str, codes: np.ndarray) -> np.ndarray:
    return codes == 0 if testbed == "v2" else scenes_v3.CODE_KIND[codes] == scenes_v3.KIND_BG


def contexts(grids: np.ndarray, offsets) -> np.ndarray:
    """grids int64 [S, H, W] -> int64 [S*H*W, len(offsets)] neighbour codes, -1 off the grid."""
    S, H, W = grids.shape
    pad = np.full((S, H + 2, W + 2), -1, np.int64)
    pad[:, 1:-1, 1:-1] = grids
    return np.stack([pad[:, 1 + dr: 1 + dr + H, 1 + dc: 1 + dc + W].ravel() for dr, dc in offsets], 1)


N8 = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
N4 = [(-1, 0), (1, 0), (0, -1), (0, 1)]


def conditional(x: np.ndarray, ctx: np.ndarray, min_seen: int):
    """Plug-in H(X|C) in bits, and per token: context count and whether the context is pure."""
    _, cid = np.unique(ctx, axis=0, return_inverse=True)
    cid = cid.ravel()
    _, pair_id, pair_n = np.unique(np.stack([cid, x], 1), axis=0, return_inverse=True, return_counts=True)
    c_n = np.bincount(cid)
    p_joint = pair_n[pair_id.ravel()] / c_n[cid]  # p(x | c) at each token
    # sum over (c, x) of p(c, x) log 1/p(x|c); + 0.0 turns a fully determined -0.0 into 0.0
    h = float(-np.mean(np.log2(p_joint))) + 0.0
    seen = c_n[cid]
    pure = p_joint == 1.0
    return h, seen >= min_seen, pure


def stats(testbed: str, n_scenes: int, seed: int, min_seen: int) -> dict:
    rng = np.random.default_rng(seed)
    grids = np.stack([draw(testbed, sample_train_spec(rng), rng) for _ in range(n_scenes)])
    x = grids.ravel()
    bg = is_background(testbed, x)
    h8, seen, pure = conditional(x, contexts(grids, N8), min_seen)
    half = len(x) // 2  # the first half of the scenes alone: how much the estimate still moves
    h8_half, _, _ = conditional(x[:half], contexts(grids[: n_scenes // 2], N8), min_seen)
    h4, _, _ = conditional(x, contexts(grids, N4), min_seen)
    counts = np.bincount(x, minlength=codebook(testbed))
    p = counts[counts > 0] / counts.sum()
    h0 = float(-(p * np.log2(p)).sum())
    pred = seen & pure
    share = lambda m, where=None: float(m[where].mean()) if where is None or where.any() else 0.0  # noqa: E731
    order = np.argsort(-counts)
    return {
        "testbed": testbed, "scenes": n_scenes, "tokens": int(len(x)), "grid": list(grids.shape[1:]),
        "codebook": int(codebook(testbed)), "codes_used": int((counts > 0).sum()),
        "H_marginal_bits": round(h0, 3), "effective_codes": round(2 ** h0, 1),
        "top_code_share": round(float(counts.max() / counts.sum()), 4),
        "top10": [[int(k), round(float(counts[k] / counts.sum()), 4)] for k in order[:10]],
        "H_given_N8_bits": round(h8, 3), "H_given_N8_bits_half_sample": round(h8_half, 3),
        "H_given_N4_bits": round(h4, 3),
        "predictable": round(share(pred), 4), "rare_context": round(share(~seen), 4),
        "background_share": round(share(bg), 4),
        "predictable_background": round(share(pred, bg), 4), "predictable_object": round(share(pred, ~bg), 4),
        "histogram": counts.tolist(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=TESTBEDS)
    ap.add_argument("--scenes", type=int, default=4000, help="drawn training scenes per testbed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-seen", type=int, default=20,
                    help="a context must be seen this often before a token in it counts as predictable")
    ap.add_argument("--json", default=None, help="also write the numbers (histograms included) here")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = [stats(t, args.scenes, args.seed, args.min_seen) for t in args.testbeds]
    head = ("testbed", "codes used/K", "eff. codes", "top code", "H(X)", "H(X|N8) half/full", "H(X|N4)",
            "predictable", "pred. bg", "pred. obj", "rare ctx")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['testbed']} | {r['codes_used']}/{r['codebook']} | {r['effective_codes']} | "
              f"{100 * r['top_code_share']:.1f}% | {r['H_marginal_bits']} | {r['H_given_N8_bits_half_sample']} / "
              f"{r['H_given_N8_bits']} | {r['H_given_N4_bits']} | {100 * r['predictable']:.1f}% | "
              f"{100 * r['predictable_background']:.1f}% | {100 * r['predictable_object']:.1f}% | "
              f"{100 * r['rare_context']:.1f}% |")
    command = "python bench/testbed/token_stats.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{args.scenes} scenes per testbed, seed {args.seed}, min-seen {args.min_seen}; {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
