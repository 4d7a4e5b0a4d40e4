"""Sampler study on the shipped testbed models (v2 and v3): score vs model evaluations, and why.

    python bench/sampler_study.py            # both testbeds, rows spread over 2 processes; minutes in RESULTS.md

Every configuration runs the same held-out prompts (``ladr_testbed.eval_items``) with the same
seeds (image k of seed s: sampler seed 1000 s + k, so a batched row is its batch-1 run), eager
fp32. Rows: the baseline at T in {8, 10, 12, 16, 24, 32, 64} (the equal-cost curve), every other
sampler at T in {32, 64}, and LADR variants of the phase table at T = 64 (the ``--ladr`` option).
Per row: overall and per-category score (scorer v3 on v3, with colour coherence, background
continuity and mosaics), mean evaluations per image, the equal-cost baseline's score at that many
evaluations (linear between the curve's points), and the step-by-step diagnostics of
``ladr_testbed.diagnostics`` (route and phase of every committed token, entropy of rescued
tokens, frontier-margin saturation, the state at the refinement bound, errors by route and phase).

Outputs: ``bench/sampler_study.json`` (everything), ``bench/sampler_study.png`` (score vs
evaluations per testbed, the baseline curve drawn), and the tables between the
``sampler-study`` markers of ``bench/RESULTS.md``. Ends with one JSON line.
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
import time
from pathlib import Path

import numpy as np
import torch

from ladr_rt.fileio import atomic_write, atomic_write_text

HERE = Path(__file__).resolve().parent
BASELINE_T = (8, 10, 12, 16, 24, 32, 64)
# (label, sampler, T, --ladr table or None)
CONFIGS = ([(f"baseline T={T}", "baseline", T, None) for T in BASELINE_T] +
           [(f"{lab} T={T}", name, T, None) for lab, name in (("LADR", "ladr"), ("LADR-delayed", "ladr-delayed"),
                                                             ("Prophet-style", "prophet"), ("threshold 0.9", "threshold"))
            for T in (32, 64)] +
           [("LADR refine w/ structure rules T=64", "ladr", 64, "tau_refine=0.05,alpha_refine=0.3"),
            ("LADR refine-only T=64", "ladr", 64, "alpha_explore=0,alpha_structure=0"),
            ("LADR tau 0.2 all phases T=64", "ladr", 64, "tau_explore=0.2,tau_structure=0.2,tau_refine=0.2"),
            ("LADR alpha x0.5 T=64", "ladr", 64, "alpha_explore=0.05,alpha_structure=0.15,alpha_refine=0.5")])
TESTBED_NAMES = {"v2": "v2 (flat background, slots)", "v3": "v3 (textured background, slots)"}
START, END = "<!-- sampler-study:start -->", "<!-- sampler-study:end -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when tracked files differ from it: the models or code a
    benchmark ran may then not be the commit's. Empty outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=HERE).stdout.strip()
    except OSError:
        return ""
    return commit + ("+dirty" if commit and dirty else "")


def chance(items, seeds, testbed: str) -> dict:
    """Reference points for the scorer: drawn scenes of the prompt (the ceiling), drawn scenes
    of another prompt of the same category (chance for a model that ignores the prompt's
    details), and uniform random codes."""
    from ladr_testbed import scenes, scenes_v3, scorer_for
    from ladr_testbed.scenes import category_specs

    if testbed == "v2":
        codebook, draw = scenes.CODEBOOK, lambda s, rng: scenes.render(scenes.sample_scene(s, rng))
    else:
        codebook, draw = scenes_v3.CODEBOOK, lambda s, rng: scenes_v3.draw(s, rng, "slots")
    score = scorer_for(testbed)
    rng = np.random.default_rng(1234)
    truth, other, rand, specs = [], [], [], []
    for _seed in seeds:
        for s in items:
            same = [t for t in category_specs(s.category) if t.prompt != s.prompt]
            decoy = same[rng.integers(len(same))]
            specs.append(s)
            truth.append(draw(s, rng))
            other.append(draw(decoy, rng))
            rand.append(rng.integers(0, codebook, truth[-1].shape))
    return {"ground_truth": score(specs, truth), "other_prompt": score(specs, other), "uniform": score(specs, rand)}


def std_error(sc: dict) -> float:
    """Standard error of the overall score (the mean of the category means), binomial per category."""
    cats = sc["categories"]
    var = sum(p * (1 - p) / sc["n"][c] for c, p in cats.items()) / len(cats) ** 2
    return float(np.sqrt(var))


def equal_cost(curve: list[tuple[float, float]], evals: float) -> float | None:
    """The baseline curve's score at ``evals`` evaluations (linear between its points), None outside it."""
    xs, ys = zip(*sorted(curve))
    if not xs[0] <= evals <= xs[-1]:
        return None
    return float(np.interp(evals, xs, ys))


def selected(args) -> list:
    """The CONFIGS rows that --only and --steps keep."""
    return [c for c in CONFIGS if (not args.only or c[1] in args.only) and (not args.steps or c[2] in args.steps)]


def check(args, ap) -> None:
    """Every bad option or model is one line before anything runs or any output is replaced."""
    from ladr_rt.checkpoint import CheckpointError
    from ladr_testbed import model_dir, testbed_of

    for flag, v in (("--batch", args.batch), ("--per-category", args.per_category), ("--threads", args.threads),
                    ("--jobs", args.jobs)):
        if v < 1:
            ap.error(f"{flag} must be at least 1, got {v}")
    if any(not 0 <= sd < 2 ** 40 for sd in args.seeds):  # image k of seed s is sampled with 1000 s + k
        ap.error(f"--seeds must lie between 0 and 2**40, got {args.seeds}")
    if not selected(args):
        ap.error(f"no study row has sampler {' or '.join(args.only or ['any'])} and T "
                 f"{' or '.join(map(str, args.steps or ['any']))}; samplers: "
                 f"{', '.join(sorted({c[1] for c in CONFIGS}))}; T: {', '.join(str(t) for t in sorted({c[2] for c in CONFIGS}))}")
    for tb in args.testbeds:
        mdir = Path(args.model or model_dir(tb))
        try:
            kind = testbed_of(mdir)
        except (CheckpointError, ValueError) as e:
            ap.error(f"--model: {e}")
        if kind != tb:
            ap.error(f"--model {mdir} is a {kind} testbed model, not {tb}: pass --testbeds {kind}")


_PIPES: dict = {}  # per worker process: testbed -> pipeline, loaded once, warmed up


def _pipeline(testbed: str, args):
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline
    from ladr_testbed import eval_items, model_dir

    if testbed not in _PIPES:
        mdir = Path(args.model or model_dir(testbed))
        pipe = LadrPipeline.from_pretrained(mdir, args.size, args.size, args.prompt_budget, batch=args.batch)
        pipe.generate_codes([eval_items(1)[0].prompt] * args.batch, SamplerConfig(steps=8, cfg=args.cfg))  # warm-up
        _PIPES[testbed] = pipe
    return _PIPES[testbed]


def run_row(testbed: str, config: tuple, args) -> dict:
    """One study row: every held-out item once per seed with one sampler setting. Rows are
    independent (each image has its own seed), so which process runs a row changes nothing."""
    from ladr_rt.config import LadrParams
    from ladr_testbed import eval_items
    from ladr_testbed.diagnostics import Probe
    from ladr_testbed.evaluate import evaluate

    label, name, T, table = config
    pipe = _pipeline(testbed, args)
    ladr = LadrParams.from_option(table, name) if table else LadrParams()
    sampler = dict(name=name, steps=T, cfg=args.cfg, temperature=args.temperature, ladr=ladr)
    probe = Probe(testbed, ladr)
    t0 = time.perf_counter()
    ev = evaluate(pipe, eval_items(args.per_category), args.seeds, testbed, probe, **sampler)
    wall = time.perf_counter() - t0
    sc = ev.score
    row = {"label": label, "sampler": name, "T": T, "ladr": table, "overall": sc["overall"],
           "overall_se": std_error(sc), "categories": sc["categories"],
           "evaluations_mean": float(np.mean(ev.evaluations)), "evaluations_max": int(np.max(ev.evaluations)),
           "seconds_per_image": float(np.median(ev.calls)) / args.batch, "wall_seconds": round(wall, 1),
           "images": len(ev.grids), "diagnostics": probe.summary(), "cfg": ev.cfg,
           "per_image": [{"prompt": sp.prompt, "category": sp.category, "evaluations": n}
                         for sp, n in zip(ev.specs, ev.evaluations)]}
    for k in ("coherence", "continuity", "mosaics"):
        if k in sc:
            row[k] = sc[k]
    print(f"[{testbed}] {label:36s} score {row['overall']:.3f}  evals {row['evaluations_mean']:5.1f}  "
          f"{wall:5.1f} s  " + " ".join(f"{c}={v:.2f}" for c, v in sc["categories"].items()), flush=True)
    return row


def assemble(testbed: str, rows: list[dict], args) -> dict:
    """A testbed's report from its rows (in CONFIGS order): the equal-cost baseline per row,
    the model's training record and the scorer's reference points."""
    from ladr_testbed import eval_items, model_dir

    mdir = Path(args.model or model_dir(testbed))
    curve = [(r["evaluations_mean"], r["overall"]) for r in rows if r["sampler"] == "baseline"]
    for r in rows:
        if r["sampler"] != "baseline" and len(curve) >= 2:
            r["equal_cost_baseline"] = equal_cost(curve, r["evaluations_mean"])
    training = json.loads((mdir / "training.json").read_text()) if (mdir / "training.json").is_file() else {}
    return {"model": str(mdir.relative_to(HERE.parent)) if mdir.is_relative_to(HERE.parent) else str(mdir),
            "model_training": training, "cfg": rows[0]["cfg"] if rows else args.cfg,
            "reference": chance(eval_items(args.per_category), args.seeds, testbed),
            "results": [{k: v for k, v in r.items() if k != "cfg"} for r in rows]}


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _job(job) -> dict:
    testbed, config, args = job
    torch.set_num_threads(args.threads)
    return run_row(testbed, config, args)


def cost(config: tuple) -> int:
    """Rough evaluations per image, to start the longest rows first (the baseline spends T;
    the others stop early)."""
    return config[2] if config[1] == "baseline" else config[2] // 3


def run(args) -> dict:
    from ladr_testbed import eval_items

    t0 = time.perf_counter()
    jobs = [(tb, c, args) for tb in args.testbeds for c in selected(args)]
    order = sorted(range(len(jobs)), key=lambda i: -cost(jobs[i][1]))  # longest first: the pool ends together
    procs = min(args.jobs, len(jobs))
    if procs > 1:  # rows spread over processes: small models scale better so than by threads
        import multiprocessing as mp

        # Workers ignore Ctrl-C: the parent takes it and the pool's exit terminates them quietly.
        with mp.get_context("spawn").Pool(procs, _ignore_sigint) as pool:
            done = pool.map(_job, [jobs[i] for i in order], chunksize=1)
        rows = dict(zip(order, done))
    else:
        rows = {i: _job(jobs[i]) for i in order}
    testbeds = {tb: assemble(tb, [rows[i] for i in range(len(jobs)) if jobs[i][0] == tb], args)
                for tb in args.testbeds}
    commit = git_commit()
    return {
        "command": " ".join(["python bench/sampler_study.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} with "
                   f"{args.threads} thread(s) in each of {procs} process(es) "
                   f"(rows spread over them), eager fp32, batch {args.batch}",
        "git_commit": commit, "minutes": round((time.perf_counter() - t0) / 60, 1),
        "settings": {"size": args.size, "prompt_budget": args.prompt_budget, "temperature": args.temperature,
                     "seeds": args.seeds, "per_category": args.per_category, "batch": args.batch,
                     "prompts": sorted({s.prompt for s in eval_items(args.per_category)})},
        "testbeds": testbeds,
    }


def _pct(x, digits=0) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _num(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def score_table(tb: str, rep: dict) -> str:
    from ladr_testbed import CATEGORIES

    short = {"single_object": "single", "two_object": "two obj", "counting": "count", "colors": "colours",
             "position": "position", "color_attr": "attr"}
    v3 = tb != "v2"
    extra = " coherence | continuity | mosaics/image |" if v3 else ""
    head = ("| sampler | overall ± se | " + " | ".join(short[c] for c in CATEGORIES) +
            " | evals/image | equal-cost baseline | gain vs it |" + extra)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rep["results"]:
        eq = r.get("equal_cost_baseline")
        gain = "–" if eq is None else f"{100 * (r['overall'] - eq):+.1f}"
        ext = (f" {_num(r['coherence'])} | {_num(r['continuity'])} | {_num(r['mosaics'])} |" if v3 else "")
        lines.append(f"| {r['label']} | {100 * r['overall']:.1f} ± {100 * r['overall_se']:.1f} | " +
                     " | ".join(_pct(r["categories"].get(c)) for c in CATEGORIES) +
                     f" | {r['evaluations_mean']:.1f} | {_pct(eq, 1)} | {gain} |" + ext)
    for key, label in (("ground_truth", "drawn scene of the prompt (ceiling)"),
                       ("other_prompt", "drawn scene of another prompt, same category (chance)"),
                       ("uniform", "uniform random codes")):
        ref = rep["reference"][key]
        ext = (f" {_num(ref['coherence'])} | {_num(ref['continuity'])} | {_num(ref['mosaics'])} |" if v3 else "")
        lines.append(f"| *{label}* | {100 * ref['overall']:.1f} | " +
                     " | ".join(_pct(ref["categories"].get(c)) for c in CATEGORIES) + " | – | – | – |" + ext)
    return "\n".join(lines)


DIAG_ROWS = ("baseline T=64", "baseline T=12", "LADR T=64", "LADR-delayed T=64", "LADR refine w/ structure rules T=64",
             "LADR refine-only T=64", "LADR tau 0.2 all phases T=64", "LADR alpha x0.5 T=64",
             "threshold 0.9 T=64")


def diagnostics_table(report: dict) -> str:
    head = ("| testbed | sampler | evals | rescued / all commits % | rescued that are background (explore + structure) % "
            "| entropy of rescued, nats (bg / object) | entropy of standard picks, nats "
            "| frontier margin > 0.05 % (structure; median) | at the refinement bound: object tokens decided "
            "| slots wholly masked | final objects not started | errors/image | errors from rescue % "
            "| errors from refinement % | error rate rescue/refine % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label in DIAG_ROWS:
        for tb, rep in report["testbeds"].items():
            r = next((x for x in rep["results"] if x["label"] == label), None)
            if r is None:
                continue
            d = r["diagnostics"]
            if d.get("tokens", 0) == 0:
                continue
            fr = (d["frontier_margin"] or {}).get("structure")
            frs = "–" if fr is None else f"{100 * fr['above_tau']:.0f} ({fr['median']:.2f})"
            b = d["at_refinement_bound"]
            eb = d["errors_by"]
            resc_err = sum(v for k, v in eb.items() if k.startswith("rescue") and v is not None) if d["errors"] else None
            ref_err = sum(v for k, v in eb.items() if k.endswith("refine") and v is not None) if d["errors"] else None
            rate = d["error_rate_by"].get("rescue/refine")
            lines.append(
                f"| {tb} | {label} | {r['evaluations_mean']:.1f} | {_pct(d['rescued_share'])} | "
                f"{_pct(d['rescued_background_share_explore_structure'], 1)} | "
                f"{_num(d['entropy_nats_rescued_background'])} / {_num(d['entropy_nats_rescued_object'])} | "
                f"{_num(d['entropy_nats']['standard'])} | {frs} | {b['object_tokens_decided']:.1f} | "
                f"{b['slots_wholly_masked']:.1f} | {b['final_objects_not_started']:.2f} of {b['final_objects']:.2f} | "
                f"{d['errors'] / d['images']:.1f} | {_pct(resc_err)} | {_pct(ref_err)} | {_pct(rate)} |")
    return "\n".join(lines)


def table(report: dict) -> str:
    s = report["settings"]
    parts = [f"{START}\n"
             f"Command: `{report['command']}` — {report['date']}, git {report['git_commit']}, "
             f"{report['minutes']} min in all.\n"
             f"Machine: {report['machine']}.\n"
             f"Per row: {s['per_category']} held-out prompts x 6 categories x seeds {s['seeds']}; "
             f"{s['size']}x{s['size']} px ({s['size'] // 16}x{s['size'] // 16} tokens), temperature "
             f"{s['temperature']}. Scores in %, overall = mean of the category scores, ± its binomial standard "
             "error. *Equal-cost baseline*: the baseline curve's score at the row's mean evaluations.\n"]
    for tb, rep in report["testbeds"].items():
        n_img = rep["results"][0]["images"] if rep["results"] else 0
        parts.append(f"\n**Testbed {TESTBED_NAMES.get(tb, tb)}**: model `{rep['model']}`, cfg {rep['cfg']}, "
                     f"{n_img} images per row.\n\n" + score_table(tb, rep) + "\n")
    parts.append("\n**Diagnostics** (`ladr_testbed/diagnostics.py`; phases by t_eff against the paper's bounds "
                 "0.2 / 0.7 for every sampler; errors = final-grid tokens that break local coherence: speckle, "
                 "off-colour object tokens, and on v3 breaks in the background field):\n\n"
                 + diagnostics_table(report) + "\n")
    parts.append("\n![score vs evaluations](sampler_study.png)\n" + END)
    return "".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tbs = list(report["testbeds"])
    fig, axes = plt.subplots(1, len(tbs), figsize=(6 * len(tbs), 4.4), dpi=100, squeeze=False)
    colours = {"baseline": "tab:gray", "ladr": "tab:red", "ladr-delayed": "tab:orange", "prophet": "tab:blue",
               "threshold": "tab:green"}
    for ax, tb in zip(axes[0], tbs):
        rep = report["testbeds"][tb]
        base = sorted((r for r in rep["results"] if r["sampler"] == "baseline"), key=lambda r: r["evaluations_mean"])
        if base:
            ax.plot([r["evaluations_mean"] for r in base], [100 * r["overall"] for r in base], "-", color="tab:gray",
                    lw=1, zorder=1, label="baseline (equal-cost curve)")
        others = 0
        for r in rep["results"]:
            c = "tab:purple" if r["ladr"] else colours.get(r["sampler"], "k")
            ax.errorbar(r["evaluations_mean"], 100 * r["overall"], yerr=100 * r["overall_se"], fmt="o", ms=4,
                        color=c, zorder=2, lw=0.8)
            if r["sampler"] == "baseline":
                ax.annotate(f"T={r['T']}", (r["evaluations_mean"], 100 * r["overall"]), fontsize=6,
                            xytext=(2, -9), textcoords="offset points", color="tab:gray")
            else:  # LADR's points crowd around 10-20 evaluations: stagger their labels
                ax.annotate(r["label"], (r["evaluations_mean"], 100 * r["overall"]), fontsize=6, color=c,
                            xytext=(6, 10 * (others % 4) - 12), textcoords="offset points",
                            arrowprops=dict(arrowstyle="-", lw=0.3, color=c))
                others += 1
        ch = 100 * rep["reference"]["other_prompt"]["overall"]
        ax.axhline(ch, ls=":", color="k", lw=1)
        ax.text(1.05, ch + 0.5, "chance (other prompt)", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, 100)
        ax.set_xlabel("model evaluations per image (mean)")
        ax.set_ylabel("testbed GenEval-style score (%)")
        ax.set_title(f"Testbed {TESTBED_NAMES.get(tb, tb)}", fontsize=10)
        top = max([100 * r["overall"] for r in rep["results"]] + [0])
        ax.set_ylim(0, min(100, max(25, 1.25 * top)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
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


def summary_line(report: dict) -> str:
    """The one JSON line a benchmark ends with: per testbed, each row's score and evaluations."""
    return json.dumps({"sampler_study": {tb: {r["label"]: [round(r["overall"], 4), round(r["evaluations_mean"], 2)]
                                              for r in rep["results"]} for tb, rep in report["testbeds"].items()},
                       "date": report["date"], "git": report["git_commit"], "minutes": report["minutes"]})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbeds", nargs="+", choices=("v2", "v3"), default=["v2", "v3"])
    ap.add_argument("--model", default=None, help="checkpoint directory, with one --testbeds [default: the shipped one]")
    ap.add_argument("--per-category", type=int, default=4, help="held-out prompts per category (cycled)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="*", default=None, help="run only these samplers")
    ap.add_argument("--steps", type=int, nargs="*", default=None, help="run only rows with these T")
    ap.add_argument("--batch", type=int, default=1,
                    help="images per pipeline call (each its batch-1 run; on 2 CPU cores batching does not pay)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--prompt-budget", type=int, default=24)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale [default: each model's ladr_default_cfg]")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--jobs", type=int, default=2, help="processes; the rows are spread over them, longest first")
    ap.add_argument("--json", default=str(HERE / "sampler_study.json"))
    ap.add_argument("--plot", default=str(HERE / "sampler_study.png"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose tables are replaced")
    ap.add_argument("--replot", action="store_true", help="only redraw plot and tables from --json")
    args = ap.parse_args(argv)
    if args.model and len(args.testbeds) != 1:
        ap.error("--model needs exactly one --testbeds (whose scorer judges it)")
    if args.replot:  # redraw the plot and table from a finished run's JSON, without re-running it
        try:
            report = json.loads(Path(args.json).read_text())
            report["testbeds"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--replot: {args.json} is not a sampler study's JSON ({type(e).__name__}: {e}); run the study "
                     "without --replot to make one")
    else:
        check(args, ap)
        try:
            report = run(args)
        except KeyboardInterrupt:  # the pool's workers end with it; nothing was written yet
            print("sampler_study: interrupted; no output written", file=sys.stderr)
            raise SystemExit(130)
        atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    plot(report, Path(args.plot))
    update_results(report, Path(args.results))
    print(f"wrote {args.json}, {args.plot}, {args.results}", file=sys.stderr)
    print(summary_line(report))


if __name__ == "__main__":
    main()
