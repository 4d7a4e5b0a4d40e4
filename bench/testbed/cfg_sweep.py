"""Guidance sweep: held-out score per guidance scale, the measurement behind a model's
``ladr_default_cfg`` (config.json).

    python bench/testbed/cfg_sweep.py --model ladr_rt/assets/testbed   # ~8 min on 2 idle cores
    python bench/testbed/cfg_sweep.py --model ladr_rt/assets/testbed_v3   # v3: scored by scorer v3

Per scale: the 64-step baseline (the issue's acceptance sampler) and LADR at T=64 (the
``generate`` default) over 8 held-out prompts per category, seed 0, temperature 1; one
worker process per core, one thread each. Prints a markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import shlex
import sys
from pathlib import Path

import numpy as np

SAMPLERS = (("baseline", 64), ("ladr", 64))


def _one(job) -> dict:
    import torch

    from ladr_rt.pipeline import LadrPipeline
    from ladr_testbed import eval_items, testbed_of
    from ladr_testbed.evaluate import evaluate

    model, size, budget, per, cfg, name, T = job
    torch.set_num_threads(1)
    pipe = LadrPipeline.from_pretrained(model, size, size, budget)
    ev = evaluate(pipe, eval_items(per), (0,), testbed_of(model), name=name, steps=T, cfg=cfg, temperature=1.0)
    sc = ev.score
    return {"cfg": cfg, "sampler": name, "T": T, "overall": sc["overall"], "categories": sc["categories"],
            "evaluations_mean": float(np.mean(ev.evaluations)), "images": len(ev.grids)}


def main(argv=None) -> None:
    from ladr_rt.fileio import atomic_write_text
    from ladr_testbed import CATEGORIES, model_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory [default: the shipped testbed model]")
    ap.add_argument("--cfgs", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    ap.add_argument("--per-category", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompt-budget", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    ap.add_argument("--json", default=None, help="write the rows here [default: print only]")
    args = ap.parse_args(argv)
    model = str(args.model or model_dir())
    from ladr_rt.checkpoint import CheckpointError
    from ladr_testbed import testbed_of

    try:
        testbed_of(model)  # a testbed's checkpoint: its scorer is known (one line here, not a worker traceback)
    except (CheckpointError, ValueError) as e:
        ap.error(f"--model: {e}")
    jobs = [(model, args.size, args.prompt_budget, args.per_category, c, n, T) for c in args.cfgs for n, T in SAMPLERS]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(_one, jobs, chunksize=1)
    head = "| cfg | sampler | overall | " + " | ".join(CATEGORIES) + " | evals |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cats = " | ".join(f"{100 * r['categories'][c]:.0f}" for c in CATEGORIES)
        lines.append(f"| {r['cfg']:g} | {r['sampler']} T={r['T']} | {100 * r['overall']:.1f} | {cats} | "
                     f"{r['evaluations_mean']:.1f} |")
    print("\n".join(lines))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps({
            "command": " ".join(["python bench/testbed/cfg_sweep.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": model, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
