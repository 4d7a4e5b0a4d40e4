"""Sampler study on the shipped testbed model: GenEval-style score vs model evaluations.

    python bench/sampler_study.py            # ~10 min on 2 idle CPU cores; writes the files below

Every sampler runs the same held-out evaluation prompts (``ladr_rt.testbed.eval_items``)
with the same seeds, batch 1, eager backend. Per configuration: overall and per-category
score, mean evaluations per image, and the median seconds per image (prompt to codes,
after one warm-up image). Outputs: ``bench/sampler_study.json`` (everything, per image
included), ``bench/sampler_study.png`` (score vs evaluations), and the table between the
``sampler-study`` markers of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ladr_rt.fileio import atomic_write, atomic_write_text

HERE = Path(__file__).resolve().parent
# (label, sampler, T): the grid
CONFIGS = [
    ("baseline T=8", "baseline", 8), ("baseline T=16", "baseline", 16), ("baseline T=32", "baseline", 32),
    ("baseline T=64", "baseline", 64),
    ("LADR T=32", "ladr", 32), ("LADR T=64", "ladr", 64),
    ("LADR-delayed T=32", "ladr-delayed", 32), ("LADR-delayed T=64", "ladr-delayed", 64),
    ("Prophet-style T=64", "prophet", 64), ("threshold 0.9 T=64", "threshold", 64),
]
START, END = "<!-- sampler-study:start -->", "<!-- sampler-study:end -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def chance(items, seeds) -> dict:
    """Reference points for the scorer: drawn scenes of the prompt (the ceiling), drawn scenes
    of another prompt of the same category (chance for a model that ignores the prompt's
    details), and uniform random codes."""
    from ladr_rt.testbed import score
    from ladr_rt.testbed.scenes import CODEBOOK, category_specs, render, sample_scene

    rng = np.random.default_rng(1234)
    truth, other, rand, specs = [], [], [], []
    for seed in seeds:
        for s in items:
            same = [t for t in category_specs(s.category) if t.prompt != s.prompt]
            decoy = same[rng.integers(len(same))]
            specs.append(s)
            truth.append(render(sample_scene(s, rng)))
            other.append(render(sample_scene(decoy, rng)))
            rand.append(rng.integers(0, CODEBOOK, truth[-1].shape))
    return {"ground_truth": score(specs, truth), "other_prompt": score(specs, other), "uniform": score(specs, rand)}


def run(args) -> dict:
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.testbed import eval_items, model_dir
    from ladr_rt.testbed.evaluate import evaluate

    torch.set_num_threads(args.threads)
    mdir = Path(args.model or model_dir())
    pipe = LadrPipeline.from_pretrained(mdir, args.size, args.size, args.prompt_budget)
    items = eval_items(args.per_category)
    configs = [c for c in CONFIGS if not args.only or c[1] in args.only]
    results, used_cfg = [], args.cfg
    for label, name, T in configs:
        sampler = dict(name=name, steps=T, cfg=args.cfg, temperature=args.temperature)
        pipe.generate_codes(items[0].prompt, SamplerConfig(**sampler))  # warm-up: first-call allocations, caches
        ev = evaluate(pipe, items, args.seeds, **sampler)
        used_cfg, sc = ev.cfg, ev.score
        row = {"label": label, "sampler": name, "T": T, "overall": sc["overall"], "categories": sc["categories"],
               "evaluations_mean": float(np.mean(ev.evaluations)), "evaluations_max": int(np.max(ev.evaluations)),
               "seconds_median": float(np.median(ev.seconds)), "images": len(ev.grids),
               "per_image": [{"prompt": sp.prompt, "category": sp.category, "evaluations": n, "seconds": round(s, 5)}
                             for sp, n, s in zip(ev.specs, ev.evaluations, ev.seconds)]}
        results.append(row)
        print(f"{label:22s} score {row['overall']:.3f}  evals {row['evaluations_mean']:5.1f}  "
              f"{row['seconds_median'] * 1000:6.1f} ms/image  " +
              " ".join(f"{c}={v:.2f}" for c, v in sc["categories"].items()), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    training = {}
    if (mdir / "training.json").is_file():
        training = json.loads((mdir / "training.json").read_text())
    return {
        "command": " ".join(["python bench/sampler_study.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} with "
                   f"{args.threads} thread(s), eager fp32, batch 1",
        "git_commit": commit, "model": str(mdir.name), "model_training": training,
        "settings": {"size": args.size, "prompt_budget": args.prompt_budget,
                     "cfg": used_cfg,
                     "temperature": args.temperature, "seeds": args.seeds, "per_category": args.per_category,
                     "prompts": sorted({s.prompt for s in items})},
        "reference": chance(items, args.seeds),
        "results": results,
    }


def table(report: dict) -> str:
    from ladr_rt.testbed import CATEGORIES

    short = {"single_object": "single", "two_object": "two obj", "counting": "count", "colors": "colours",
             "position": "position", "color_attr": "attr"}
    base = next((r for r in report["results"] if r["label"] == "baseline T=64"), None)
    head = ("| sampler | overall | " + " | ".join(short[c] for c in CATEGORIES) +
            " | evals/image | s/image (median) | speed-up vs baseline 64 |")
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 5)]
    for r in report["results"]:
        speed = f"{base['seconds_median'] / r['seconds_median']:.1f}x" if base else "-"
        lines.append(f"| {r['label']} | {100 * r['overall']:.1f} | " +
                     " | ".join(f"{100 * r['categories'].get(c, float('nan')):.0f}" for c in CATEGORIES) +
                     f" | {r['evaluations_mean']:.1f} | {r['seconds_median']:.3f} | {speed} |")
    for key, label in (("ground_truth", "drawn scene of the prompt (ceiling)"),
                       ("other_prompt", "drawn scene of another prompt, same category (chance)"),
                       ("uniform", "uniform random codes")):
        ref = report["reference"][key]
        lines.append(f"| *{label}* | {100 * ref['overall']:.1f} | " +
                     " | ".join(f"{100 * ref['categories'].get(c, float('nan')):.0f}" for c in CATEGORIES) +
                     " | - | - | - |")
    s = report["settings"]
    n_img = report["results"][0]["images"] if report["results"] else 0
    return (f"{START}\n"
            f"Command: `{report['command']}` — {report['date']}, git {report['git_commit']}.\n"
            f"Machine: {report['machine']}.\n"
            f"Model: the shipped testbed checkpoint (ladr_rt/assets/testbed/TRAINING.md). "
            f"{n_img} images per row: {s['per_category']} held-out prompts x 6 categories x seeds {s['seeds']}; "
            f"{s['size']}x{s['size']} px ({s['size'] // 16}x{s['size'] // 16} tokens), cfg {s['cfg']}, "
            f"temperature {s['temperature']}. Scores in %, overall = mean of the category scores.\n\n"
            + "\n".join(lines) + "\n\n![score vs evaluations](sampler_study.png)\n" + END)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    colours = {"baseline": "tab:gray", "ladr": "tab:red", "ladr-delayed": "tab:orange", "prophet": "tab:blue",
               "threshold": "tab:green"}
    base = [r for r in report["results"] if r["sampler"] == "baseline"]
    if base:
        ax.plot([r["evaluations_mean"] for r in base], [100 * r["overall"] for r in base], "-", color="tab:gray",
                lw=1, zorder=1)
    for r in report["results"]:
        ax.scatter(r["evaluations_mean"], 100 * r["overall"], color=colours.get(r["sampler"], "k"), zorder=2)
        ax.annotate(r["label"], (r["evaluations_mean"], 100 * r["overall"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.axhline(100 * report["reference"]["other_prompt"]["overall"], ls=":", color="k", lw=1)
    x0 = min(r["evaluations_mean"] for r in report["results"])
    ax.text(x0, 100 * report["reference"]["other_prompt"]["overall"] + 0.5, "chance (other prompt)", fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("model evaluations per image (mean)")
    ax.set_ylabel("testbed GenEval-style score (%)")
    ax.set_title("Sampler study, shipped testbed model", fontsize=10)
    top = max([100 * r["overall"] for r in report["results"]] + [0])
    ax.set_ylim(0, min(100, max(25, 1.4 * top)))  # a weak model's points would sit flat at 0-100
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, fig.savefig)


def replace_section(path: Path, block: str, start: str, end: str, heading: str) -> None:
    """``block`` (which begins with ``start`` and ends with ``end``) in place of the text between
    those markers in ``path``; without them, appended under ``## heading``. Atomic."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    atomic_write_text(path, text)


def update_results(report: dict, path: Path) -> None:
    replace_section(path, table(report), START, END, "Sampler study")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory [default: the shipped testbed model]")
    ap.add_argument("--per-category", type=int, default=8, help="held-out prompts per category (cycled)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="run only these samplers")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompt-budget", type=int, default=24)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale [default: the model's ladr_default_cfg]")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "sampler_study.json"))
    ap.add_argument("--plot", default=str(HERE / "sampler_study.png"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose table is replaced")
    ap.add_argument("--replot", action="store_true", help="only redraw plot and table from --json")
    args = ap.parse_args(argv)
    if args.replot:  # redraw the plot and table from a finished run's JSON, without re-running it
        report = json.loads(Path(args.json).read_text())
        plot(report, Path(args.plot))
        update_results(report, Path(args.results))
        return
    report = run(args)
    atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot))
    update_results(report, Path(args.results))
    print(f"wrote {args.json}, {args.plot}, {args.results}")


if __name__ == "__main__":
    main()
