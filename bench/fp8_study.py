"""fp8 against fp32 on the shipped testbed models, paired: same prompts, same seeds, same rows.

    python bench/fp8_study.py                       # both testbeds, the full held-out set (~20-40 min on 2 cores)
    python bench/fp8_study.py --per-category 2 --seeds 0    # reduced

Per testbed (v2, v3):
- temperature 0 (greedy, seed 0): the share of final code tokens that are equal between fp32 and
  fp8, for baseline T=64 and LADR T=64, each precision running its own trajectory;
- the top-1/top-2 margin shift, teacher-forced: along the fp32 greedy baseline T=64 trajectory,
  every evaluation is also run by the fp8 model on the very same input, and the guided
  probabilities' margin (top-1 minus top-2, as LADR ranks tokens) is compared at every masked
  image position: quantiles per precision, the paired difference, how often the argmax differs
  and how often the margin lands on the other side of LADR's tau 0.05;
- the sampler study's rows at temperature 1 (``bench/sampler_study.py``'s seeds: image k of seed s
  is sampled with 1000 s + k) at fp32 and fp8: baseline T=64, LADR T=64 and the baseline at
  T in {8, 10, 12} (the equal-cost curve around LADR's ~10 evaluations): overall and
  per-category score, and every image whose pass/fail flips between fp32 and fp8.

Writes ``--json`` (default ``bench/fp8_study.json``); ends with one JSON line. ``--markdown`` prints
the tables of finished runs. Committed runs (reduced, see docs/fp8.md): ``bench/fp8_study_v2.json``,
``bench/fp8_study_v3.json`` (6 prompts, every row and the temperature-0 part) and
``bench/fp8_study_v2_t64.json``, ``bench/fp8_study_v3_t64.json`` (24 prompts, seed 0) and
``bench/fp8_study_t64_seed1.json`` (both testbeds, seed 1): baseline T=64 and LADR T=64 only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from sampler_study import cpu_name, equal_cost, git_commit, std_error  # noqa: E402

from ladr_rt.fileio import atomic_write_text  # noqa: E402

PRECISIONS = ("fp32", "fp8")
ROWS = [("baseline T=64", "baseline", 64), ("LADR T=64", "ladr", 64)] + \
       [(f"baseline T={T}", "baseline", T) for T in (8, 10, 12)]
TAU = 0.05  # LADR's tau_explore / tau_structure: a margin crossing it changes a token's validity

_PIPES: dict = {}


def pipeline(testbed: str, precision: str, args):
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.testbed import model_dir

    key = (testbed, precision)
    if key not in _PIPES:
        _PIPES[key] = LadrPipeline.from_pretrained(model_dir(testbed), args.size, args.size, args.prompt_budget,
                                                   dtype=precision)
    return _PIPES[key]


def passes_fn(testbed: str):
    from ladr_rt.testbed import scorer, scorer_v3

    return scorer.passes if testbed == "v2" else scorer_v3.passes_v3


def row_job(testbed: str, precision: str, row: tuple, args) -> dict:
    """One study row at one precision, temperature 1, every held-out item per seed."""
    from ladr_rt.testbed import eval_items
    from ladr_rt.testbed.evaluate import evaluate

    label, name, T = row
    pipe = pipeline(testbed, precision, args)
    t0 = time.perf_counter()
    ev = evaluate(pipe, eval_items(args.per_category), args.seeds, testbed, None, name=name, steps=T, cfg=None,
                  temperature=1.0)
    sc = ev.score
    ok = passes_fn(testbed)
    n = len(eval_items(args.per_category))
    out = {"testbed": testbed, "precision": precision, "label": label, "sampler": name, "T": T,
           "overall": sc["overall"], "overall_se": std_error(sc), "categories": sc["categories"],
           "evaluations_mean": float(np.mean(ev.evaluations)), "images": len(ev.grids),
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "pass": [bool(ok(sp, g)) for sp, g in zip(ev.specs, ev.grids)],
           "items": [{"prompt": sp.prompt, "category": sp.category, "seed": 1000 * args.seeds[i // n] + i % n}
                     for i, sp in enumerate(ev.specs)]}
    print(f"[{testbed} {precision}] {label:16s} score {out['overall']:.3f} evals {out['evaluations_mean']:5.1f} "
          f"{out['wall_seconds']:6.1f} s", flush=True)
    return out


class PairedDenoiser:
    """Runs the reference denoiser (whose logits drive the run) and the other one on the same
    input, and records the guided top-1/top-2 margins of both at the masked image positions."""

    def __init__(self, ref, other, positions: torch.Tensor, mask_id: int, cfg: float):
        self.ref, self.other, self.positions, self.mask_id, self.cfg = ref, other, positions, mask_id, cfg
        self.name, self.device, self.logits_dtype, self.ids_dtype = "paired", ref.device, ref.logits_dtype, ref.ids_dtype
        self.margins: dict[str, list[np.ndarray]] = {"ref": [], "other": []}
        self.argmax_equal: list[np.ndarray] = []

    def _guided(self, logits: torch.Tensor, B: int) -> torch.Tensor:
        lg = logits.float()
        return (1 + self.cfg) * lg[:B] - self.cfg * lg[B:] if self.cfg > 0 else lg[:B]

    def __call__(self, ids, key_mask, out) -> None:
        self.ref(ids, key_mask, out)
        other = torch.empty_like(out)
        self.other(ids, key_mask, other)
        B = ids.shape[0] // 2
        masked = ids[:B].index_select(1, self.positions) == self.mask_id  # [B, N]
        for key, lg in (("ref", out), ("other", other)):
            p = torch.softmax(self._guided(lg, B), dim=-1)
            top = p.topk(2, dim=-1).values
            self.margins[key].append((top[..., 0] - top[..., 1])[masked].numpy())
        a = self._guided(out, B).argmax(-1)[masked]
        b = self._guided(other, B).argmax(-1)[masked]
        self.argmax_equal.append((a == b).numpy())


def quantiles(x: np.ndarray) -> dict:
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    return {"mean": float(x.mean()), **{f"q{int(100 * q)}": float(np.quantile(x, q)) for q in qs}}


def greedy_job(testbed: str, args) -> dict:
    """Temperature 0: token agreement of baseline/LADR T=64 runs, and the teacher-forced margins."""
    from ladr_rt.config import SamplerConfig
    from ladr_rt.testbed import eval_items

    items = eval_items(args.per_category)
    t0 = time.perf_counter()
    res: dict = {"testbed": testbed, "images": len(items), "seed": 0}
    for label, name in (("baseline T=64", "baseline"), ("LADR T=64", "ladr")):
        codes = {}
        for prec in PRECISIONS:
            pipe = pipeline(testbed, prec, args)
            codes[prec] = [pipe.generate_codes(sp.prompt, SamplerConfig(name=name, steps=64, temperature=0.0, seed=k))[0]
                           .cpu().numpy() for k, sp in enumerate(items)]
        eq = [float((a == b).mean()) for a, b in zip(codes["fp32"], codes["fp8"])]
        res[f"token_agreement {label}"] = {"mean": float(np.mean(eq)), "min": float(np.min(eq)),
                                           "identical_images": int(sum(e == 1.0 for e in eq))}
    ref = pipeline(testbed, "fp32", args)
    other = pipeline(testbed, "fp8", args)
    paired = PairedDenoiser(ref.denoiser, other.denoiser, ref.positions, ref.layout.mask, ref.default_cfg)
    saved = ref.denoiser
    ref.denoiser = paired
    try:
        for k, sp in enumerate(items):
            ref.generate_codes(sp.prompt, SamplerConfig(name="baseline", steps=64, temperature=0.0, seed=k))
    finally:
        ref.denoiser = saved
    m32, m8 = np.concatenate(paired.margins["ref"]), np.concatenate(paired.margins["other"])
    d = m8 - m32
    res["margins"] = {
        "trajectory": "fp32 greedy baseline T=64, every evaluation also run at fp8 on the same input",
        "cfg": ref.default_cfg, "masked_positions": int(m32.size),
        "fp32": quantiles(m32), "fp8": quantiles(m8), "fp8_minus_fp32": quantiles(d),
        "abs_diff_mean": float(np.abs(d).mean()), "abs_diff_q99": float(np.quantile(np.abs(d), 0.99)),
        "argmax_equal_share": float(np.concatenate(paired.argmax_equal).mean()),
        f"tau_{TAU}_side_flips_share": float(((m32 > TAU) != (m8 > TAU)).mean())}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{testbed}] greedy: " + json.dumps({k: v for k, v in res.items() if k.startswith("token")}), flush=True)
    return res


def _job(job):
    torch.set_num_threads(1)
    kind, testbed, precision, row, args = job
    return greedy_job(testbed, args) if kind == "greedy" else row_job(testbed, precision, row, args)


def assemble(testbed: str, rows: list[dict], greedy: dict) -> dict:
    by = {(r["precision"], r["label"]): r for r in rows}
    out: dict = {"greedy": greedy, "rows": {}}
    for prec in PRECISIONS:
        curve = [(r["evaluations_mean"], r["overall"]) for r in rows if r["precision"] == prec and r["sampler"] == "baseline"]
        for r in rows:
            if r["precision"] == prec and r["sampler"] != "baseline":
                r["equal_cost_baseline"] = equal_cost(curve, r["evaluations_mean"])
    for label in dict.fromkeys(r["label"] for r in rows):
        a, b = by[("fp32", label)], by[("fp8", label)]
        flips = [{**it, "fp32": pa, "fp8": pb} for it, pa, pb in zip(a["items"], a["pass"], b["pass"]) if pa != pb]
        out["rows"][label] = {
            "fp32": {k: v for k, v in a.items() if k not in ("pass", "items")},
            "fp8": {k: v for k, v in b.items() if k not in ("pass", "items")},
            "fp8_minus_fp32_points": round(100 * (b["overall"] - a["overall"]), 1),
            "flips": flips, "flips_to_fail": sum(f["fp32"] for f in flips),
            "flips_to_pass": sum(not f["fp32"] for f in flips)}
    return out


def markdown(report: dict) -> str:
    """The report's tables (docs/fp8.md quotes them): greedy agreement and margins, then the rows."""
    from ladr_rt.testbed import CATEGORIES

    short = {"single_object": "single", "two_object": "two obj", "counting": "count", "colors": "colours",
             "position": "position", "color_attr": "attr"}
    s = report["settings"]
    out = [f"Command: `{report['command']}` — {report['date']}, git {report['git_commit']}, {report['minutes']} min. "
           f"Machine: {report['machine']}. {s['prompts']} held-out prompts x seeds {s['seeds']}, {s['size']}x{s['size']} px."]
    for tb, rep in report["testbeds"].items():
        g = rep["greedy"]
        if g is None:
            out.append(f"\n**Testbed {tb}** (no temperature-0 part in this run)")
        else:
            m = g["margins"]
            out.append(f"\n**Testbed {tb}**, temperature 0 ({g['images']} prompts, seed 0): final codes equal between fp32 and "
                   "fp8 — " + "; ".join(f"{k.split(' ', 1)[1]}: {100 * v['mean']:.1f}% (lowest image {100 * v['min']:.1f}%, "
                                        f"{v['identical_images']} identical)" for k, v in g.items()
                                        if k.startswith("token_agreement")) + ".")
            out.append(f"Margins (top-1 minus top-2 of the guided probabilities, cfg {m['cfg']}) at {m['masked_positions']} "
                       f"masked positions along the fp32 greedy baseline T=64 runs, fp8 on the same inputs: median "
                       f"{m['fp32']['q50']:.3f} (fp32) vs {m['fp8']['q50']:.3f} (fp8), mean {m['fp32']['mean']:.3f} vs "
                       f"{m['fp8']['mean']:.3f}; paired difference fp8 - fp32: mean {m['fp8_minus_fp32']['mean']:+.4f}, "
                       f"10-90% [{m['fp8_minus_fp32']['q10']:+.3f}, {m['fp8_minus_fp32']['q90']:+.3f}], mean |diff| "
                       f"{m['abs_diff_mean']:.4f}, 99th percentile |diff| {m['abs_diff_q99']:.3f}; argmax equal at "
                       f"{100 * m['argmax_equal_share']:.1f}%; on the other side of tau {TAU} at "
                       f"{100 * m[f'tau_{TAU}_side_flips_share']:.1f}%.")
        head = "| row | precision | overall | " + " | ".join(short[c] for c in CATEGORIES) + \
               " | evals/image | equal-cost baseline | fp8 - fp32 (points) | flips (to fail / to pass) |"
        out += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for label, r in rep["rows"].items():
            for prec in PRECISIONS:
                x = r[prec]
                eq = x.get("equal_cost_baseline")
                tail = (f" {r['fp8_minus_fp32_points']:+.1f} | {r['flips_to_fail']} / {r['flips_to_pass']} |"
                        if prec == "fp8" else " | |")
                out.append(f"| {label} | {prec} | {100 * x['overall']:.1f} | " +
                           " | ".join("–" if c not in x["categories"] else f"{100 * x['categories'][c]:.0f}"
                                      for c in CATEGORIES) +
                           f" | {x['evaluations_mean']:.1f} | {'–' if eq is None else f'{100 * eq:.1f}'} |" + tail)
        flips = [(label, f) for label, r in rep["rows"].items() for f in r["flips"]]
        out.append("\nImages that flip: " + ("none" if not flips else "; ".join(
            f"{label}: \"{f['prompt']}\" ({f['category']}, seed {f['seed']}) {'pass -> fail' if f['fp32'] else 'fail -> pass'}"
            for label, f in flips)) + ".")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", nargs="+", choices=("v2", "v3"), default=["v2", "v3"])
    ap.add_argument("--per-category", type=int, default=4, help="held-out prompts per category (cycled)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompt-budget", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "fp8_study.json"))
    ap.add_argument("--markdown", nargs="+", metavar="JSON", help="only print the tables of finished runs' JSON")
    ap.add_argument("--rows", nargs="+", default=None, choices=[r[0] for r in ROWS], help="only these rows")
    ap.add_argument("--no-greedy", action="store_true", help="skip the temperature-0 agreement and margins")
    args = ap.parse_args(argv)
    if args.markdown:
        for f in args.markdown:
            print(markdown(json.loads(Path(f).read_text())) + "\n")
        return
    if args.per_category < 1 or args.jobs < 1 or any(not 0 <= s < 2 ** 40 for s in args.seeds):
        ap.error("--per-category and --jobs must be at least 1, --seeds between 0 and 2**40")
    t0 = time.perf_counter()
    jobs = [] if args.no_greedy else [("greedy", tb, None, None, args) for tb in args.testbeds]
    jobs += [("row", tb, p, r, args) for tb in args.testbeds for p in PRECISIONS for r in ROWS
             if not args.rows or r[0] in args.rows]
    jobs.sort(key=lambda j: -(300 if j[0] == "greedy" else j[3][2] * (1.5 if j[2] == "fp8" else 1)))
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            done = pool.map(_job, jobs, chunksize=1)
    else:
        done = [_job(j) for j in jobs]
    testbeds = {}
    for tb in args.testbeds:
        greedy = next((d for j, d in zip(jobs, done) if j[0] == "greedy" and j[1] == tb), None)
        rows = [d for j, d in zip(jobs, done) if j[0] == "row" and j[1] == tb]
        testbeds[tb] = assemble(tb, rows, greedy)
    from ladr_rt.testbed import eval_items

    report = {"command": " ".join(["python bench/fp8_study.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores visible (shared with other jobs), torch "
                         f"{torch.__version__}, 1 thread in each of {args.jobs} process(es); fp8 = e4m3 trunk "
                         "linears via torch._scaled_mm row-wise, the rest fp32",
              "git_commit": git_commit(), "minutes": round((time.perf_counter() - t0) / 60, 1),
              "settings": {"size": args.size, "prompt_budget": args.prompt_budget, "seeds": args.seeds,
                           "per_category": args.per_category, "cfg": "each model's ladr_default_cfg",
                           "prompts": len(eval_items(args.per_category))},
              "testbeds": testbeds}
    atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    print(json.dumps({"fp8_study": {tb: {lab: [r["fp32"]["overall"], r["fp8"]["overall"], len(r["flips"])]
                                         for lab, r in rep["rows"].items()} for tb, rep in testbeds.items()},
                      "minutes": report["minutes"]}))


if __name__ == "__main__":
    main()
