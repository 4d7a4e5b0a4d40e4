"""Serving load benchmark (issue 15): the step-level ``Scheduler`` under closed-loop clients, in-process.

    python bench/serve_load.py --rss-requests 1000 --results bench/RESULTS.md --plot bench/serve_load.png

Per configuration (mode x batch size B; sequential at B = 1, static and continuous at every
``--batches``) one ``Scheduler`` over the shipped testbed model (eager, CPU, fp32, LADR, the
model's default cfg, temperature 1). ``--clients`` threads (default 2·B) work through one fixed
request list (``--requests`` held-out testbed prompts, seeds 0..N-1, the same list for every
configuration), each waiting for its future before sending the next (closed loop). Timing
starts after ``--warmup`` requests per slot; submission stops after ``--max-seconds``.

Per configuration: images/s, p50/p95/p99 latency (submit -> result, VQ decode included),
errors by type, the scheduler's steps and the mean evaluations per image. For static vs
continuous at each B the ideal throughput ratio from the static run's own batches:
static pays max(evaluations) per batch, continuous the mean, so
``ideal = mean over static batches of max(evals in batch) / mean(evals)`` (batches in the
order static ran them, recorded in the JSON), against the measured continuous/static
images/s. Every request's codes and image bytes are hashed; ``images_equal_across_modes``
says whether each request that finished in several configurations gave the same image.

``--rss-requests N``: resident memory (/proc/self/statm) before and after N more requests through one
continuous scheduler at ``--rss-batch`` (after its own warm-up), with samples along the way.

Outputs: a table on stdout, ``--json`` (everything, per request included), ``--plot``
(optional), the ``serve-load`` section of ``--results`` (optional) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark's helpers, however this file is loaded
from sampler_study import cpu_name, replace_section  # noqa: E402
START, END = "<!-- serve-load:start -->", "<!-- serve-load:end -->"
MiB = 1 << 20


def machine(threads: int) -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": threads,
            "load_average_at_start": load, "python": platform.python_version(), "platform": platform.platform(),
            "parallel_info": torch.__config__.parallel_info().strip().splitlines(),
            "numerics_env": {k: os.environ.get(k) for k in ("MKL_CBWR", "MKL_DYNAMIC", "OMP_DYNAMIC", "OMP_NUM_THREADS",
                                                            "MKL_NUM_THREADS")}}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return ""


def request_list(n: int) -> list[tuple[str, int]]:
    """(prompt, seed): held-out testbed prompts in ``eval_items`` order (cycled), seeds 0..n-1."""
    from ladr_rt.testbed import eval_items

    items = eval_items(8)
    return [(items[i % len(items)].prompt, i) for i in range(n)]


def percentile(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def image_digest(res) -> str:
    h = hashlib.sha256(np.ascontiguousarray(res.codes).tobytes())
    img = res.image
    h.update(f"{img.size}{img.mode}".encode())
    h.update(img.tobytes())
    return h.hexdigest()[:16]


class Load:
    """Closed-loop clients over one scheduler: each takes the next request index, submits it
    and waits for the result before taking another."""

    def __init__(self, sched, requests, clients: int, steps: int | None, max_seconds: float | None,
                 keep: bool = True, on_done=None):
        self.sched, self.requests, self.clients, self.steps = sched, requests, clients, steps
        self.max_seconds, self.keep, self.on_done = max_seconds, keep, on_done
        self.lock = threading.Lock()
        self.next = 0
        self.rows: dict[int, dict] = {}
        self.errors: dict[str, int] = {}
        self.error_examples: dict[str, str] = {}
        self.truncated = False
        self.done = 0

    def _take(self, deadline) -> int | None:
        with self.lock:
            if self.next >= len(self.requests):
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                self.truncated = True
                return None
            i, self.next = self.next, self.next + 1
            return i

    def _client(self, deadline) -> None:
        while (i := self._take(deadline)) is not None:
            prompt, seed = self.requests[i]
            t0 = time.perf_counter()
            try:
                res = self.sched.submit(prompt, seed=seed, steps=self.steps).result()
            except Exception as e:  # counted, never raised: the run reports errors == 0 or not
                with self.lock:
                    name = type(e).__name__
                    self.errors[name] = self.errors.get(name, 0) + 1
                    self.error_examples.setdefault(name, str(e)[:300])
                continue
            t1 = time.perf_counter()
            row = {"latency_s": t1 - t0, "done_s": t1, "evaluations": res.evaluations,
                   "admitted_step": res.admitted_step, "slot": res.slot, "queued_s": res.queued_seconds,
                   "run_s": res.run_seconds}
            if self.keep:
                row["digest"] = image_digest(res)
            del res
            with self.lock:
                self.done += 1
                if self.keep:
                    self.rows[i] = row
                if self.on_done is not None:
                    self.on_done(self.done)

    def run(self) -> float:
        """Wall seconds from the first submission to the last result."""
        t0 = time.perf_counter()
        deadline = None if self.max_seconds is None else t0 + self.max_seconds
        threads = [threading.Thread(target=self._client, args=(deadline,), daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def warm_up(sched, n: int, steps: int | None) -> None:
    """``n`` requests outside the measured list (other seeds), all at once, to fill every slot."""
    if n <= 0:
        return
    reqs = request_list(n)
    futs = [sched.submit(p, seed=10**9 + s, steps=steps) for p, s in reqs]
    for f in futs:
        f.result()


def static_batches(rows: dict[int, dict]) -> list[list[int]]:
    """The static run's batches in the order it ran them: requests admitted at the same
    scheduler step formed one batch (static admits only into an all-free batch)."""
    by_step: dict[int, list[int]] = {}
    for i, r in rows.items():
        by_step.setdefault(r["admitted_step"], []).append(i)
    return [sorted(by_step[k], key=lambda i: rows[i]["slot"]) for k in sorted(by_step)]


def ideal_ratio(rows: dict[int, dict], batches: list[list[int]], B: int) -> dict:
    """``ideal``: the issue's ratio, mean over batches of max(evals) / mean(evals) (full batches
    assumed). ``ideal_with_fill`` also charges static for batches it started with fewer than B
    requests: static's steps per image (sum of batch maxima / images) over a full continuous
    batch's (mean evals / B)."""
    evals = [rows[i]["evaluations"] for b in batches for i in b]
    maxes = [max(rows[i]["evaluations"] for i in b) for b in batches]
    mean_eval = float(np.mean(evals))
    return {"ideal": float(np.mean(maxes)) / mean_eval, "ideal_with_fill": B * sum(maxes) / sum(evals),
            "mean_batch_max_evaluations": float(np.mean(maxes)),
            "mean_evaluations": mean_eval, "sum_batch_max_evaluations": int(sum(maxes)),
            "mean_batch_size": float(np.mean([len(b) for b in batches]))}


def run_config(pipe, sampler_cfg, mode: str, B: int, requests, args) -> dict:
    from ladr_rt.serve import Scheduler

    clients = args.clients or 2 * B
    sched = Scheduler(pipe, sampler_cfg, mode=mode, max_queue=max(64, clients))
    try:
        warm_up(sched, args.warmup * B, args.steps)
        steps0 = sched.steps_run
        load = Load(sched, requests, clients, args.steps, args.max_seconds)
        wall = load.run()
        steps = sched.steps_run - steps0
        cfg_used = sched.cfg.cfg
    finally:
        sched.close()
    rows = load.rows
    lat = [r["latency_s"] for r in rows.values()]
    evals = [r["evaluations"] for r in rows.values()]
    n = len(rows)
    out = {"mode": mode, "batch": B, "clients": clients, "completed": n, "submitted": load.next,
           "truncated": load.truncated, "wall_s": wall, "images_per_s": n / wall if wall > 0 else None,
           "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
           "latency_p99_s": percentile(lat, 99), "latency_mean_s": float(np.mean(lat)) if lat else None,
           "queued_p50_s": percentile([r["queued_s"] for r in rows.values()], 50),
           "errors": sum(load.errors.values()), "errors_by_type": load.errors, "error_examples": load.error_examples,
           "steps_run": steps, "evaluations_total": int(sum(evals)),
           "evaluations_per_image": float(np.mean(evals)) if evals else None,
           "slot_evaluations_per_step": (sum(evals) / (steps * B)) if steps else None,  # slot occupancy
           "cfg": cfg_used,
           "per_request": {str(i): rows[i] for i in sorted(rows)}}
    for r in rows.values():
        r.pop("done_s", None)
    if mode == "static" and rows:
        batches = static_batches(rows)
        out["static_batches"] = batches
        out["ideal"] = ideal_ratio(rows, batches, B)
        out["ideal"]["steps_equal_sum_of_batch_max"] = out["ideal"]["sum_batch_max_evaluations"] == steps
    return out


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; psutil elsewhere, if installed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def rss_run(model, sampler_cfg, args) -> dict:
    """RSS before and after ``args.rss_requests`` requests through one continuous scheduler."""
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.serve import Scheduler

    B = args.rss_batch
    size = args.rss_size or args.size
    pipe = LadrPipeline.from_pretrained(model, size, size, args.prompt_budget, batch=B)
    clients = args.clients or 2 * B
    sched = Scheduler(pipe, sampler_cfg, mode="continuous", max_queue=max(64, clients))
    samples = []
    every = max(1, args.rss_requests // 10)

    def sample(done: int) -> None:
        if done % every == 0:
            samples.append({"requests": done, "rss_mib": rss_bytes() / MiB})

    try:
        warm_up(sched, max(args.warmup, 1) * B * 2, args.steps)
        gc.collect()
        before = rss_bytes()
        load = Load(sched, request_list(args.rss_requests), clients, args.steps, None, keep=False, on_done=sample)
        wall = load.run()
        gc.collect()
        after = rss_bytes()
        steps = sched.steps_run
    finally:
        sched.close()
    return {"requests": args.rss_requests, "completed": load.done, "batch": B, "size": f"{size}x{size}",
            "clients": clients, "wall_s": wall, "errors": sum(load.errors.values()), "errors_by_type": load.errors,
            "rss_before_mib": before / MiB, "rss_after_mib": after / MiB, "growth_mib": (after - before) / MiB,
            "samples": samples, "steps_run": steps}


def run(args) -> dict:
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.testbed import model_dir

    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else model_dir()
    sampler_cfg = SamplerConfig(name="ladr", steps=args.steps or SamplerConfig.steps, cfg=args.cfg,
                                temperature=args.temperature)
    requests = request_list(args.requests)
    configs = [(m, 1) for m in args.modes if m == "sequential"]
    configs += [(m, B) for B in args.batches for m in args.modes if m != "sequential"]
    report = {"command": " ".join(["python bench/serve_load.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.threads),
              "git_commit": git_commit(), "model": str(model.name),
              "settings": {"size": f"{args.size}x{args.size}", "prompt_budget": args.prompt_budget, "sampler": "ladr",
                           "steps": sampler_cfg.steps, "cfg": args.cfg, "temperature": args.temperature,
                           "requests": args.requests, "clients": args.clients or "2*B", "warmup_per_slot": args.warmup,
                           "max_seconds": args.max_seconds, "batches": args.batches, "modes": args.modes,
                           "backend": "eager", "device": "cpu", "dtype": "float32",
                           "request_list_sha": hashlib.sha256(json.dumps(requests).encode()).hexdigest()[:16]},
              "configs": []}
    pipes: dict[int, LadrPipeline] = {}
    base = None
    for mode, B in configs:
        if B not in pipes:  # one model load; other batch sizes share its weights
            if base is None:
                base = pipes[B] = LadrPipeline.from_pretrained(model, args.size, args.size, args.prompt_budget,
                                                               batch=B)
            else:
                pipes[B] = LadrPipeline(base.denoiser, base.tokenizer, base.vq, base.layout, base.seq.spec, B,
                                        base.default_cfg, base.vocab_size)
        row = run_config(pipes[B], sampler_cfg, mode, B, requests, args)
        report["configs"].append(row)
        args.log(f"{mode:10s} B={B:<2d} {row['completed']:4d} images  {row['images_per_s'] or 0:7.2f} img/s  "
                 f"p50 {row['latency_p50_s'] or 0:.3f} s  p99 {row['latency_p99_s'] or 0:.3f} s  "
                 f"steps {row['steps_run']}  errors {row['errors']}" + ("  TRUNCATED" if row["truncated"] else ""))
    report["settings"]["cfg_used"] = next((c["cfg"] for c in report["configs"]), args.cfg)
    # Images equal across configurations: every request finished in two or more of them.
    seen: dict[str, set] = {}
    for c in report["configs"]:
        for i, r in c["per_request"].items():
            seen.setdefault(i, set()).add(r["digest"])
    compared = [i for i in seen if sum(i in c["per_request"] for c in report["configs"]) > 1]
    report["images_compared"] = len(compared)
    report["images_differing"] = sorted((i for i in compared if len(seen[i]) > 1), key=int)
    report["images_equal_across_modes"] = bool(compared) and not report["images_differing"]
    report["differing_detail"] = {  # where each differing request ran, per configuration
        i: [{"mode": c["mode"], "batch": c["batch"], **{k: c["per_request"][i][k] for k in
                                                         ("digest", "evaluations", "slot", "admitted_step")}}
            for c in report["configs"] if i in c["per_request"]] for i in report["images_differing"]}
    # continuous vs static at each B: measured images/s ratio against the ideal from static's batches
    cmp = []
    for B in args.batches:
        st = next((c for c in report["configs"] if c["mode"] == "static" and c["batch"] == B), None)
        co = next((c for c in report["configs"] if c["mode"] == "continuous" and c["batch"] == B), None)
        if st and co and st.get("ideal") and st["images_per_s"] and co["images_per_s"]:
            measured = co["images_per_s"] / st["images_per_s"]
            cmp.append({"batch": B, "ideal": st["ideal"]["ideal"], "ideal_with_fill": st["ideal"]["ideal_with_fill"],
                        "static_mean_batch_size": st["ideal"]["mean_batch_size"], "measured": measured,
                        "measured_over_ideal": measured / st["ideal"]["ideal"],
                        "steps_ratio_static_over_continuous": (st["steps_run"] / max(st["completed"], 1)) /
                        (co["steps_run"] / max(co["completed"], 1))})
    report["continuous_vs_static"] = cmp
    if args.rss_requests:
        report["rss"] = rss_run(model, sampler_cfg, args)
        r = report["rss"]
        args.log(f"RSS over {r['completed']} requests (continuous B={r['batch']}, {r['size']}): "
                 f"{r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB ({r['growth_mib']:+.1f} MiB)")
    report["errors_total"] = sum(c["errors"] for c in report["configs"]) + report.get("rss", {}).get("errors", 0)
    report["truncated_any"] = any(c["truncated"] for c in report["configs"])
    return report


def _f(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: dict) -> str:
    lines = ["| mode | B | clients | images | images/s | p50 s | p95 s | p99 s | steps | evals/image | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["configs"]:
        lines.append(f"| {c['mode']} | {c['batch']} | {c['clients']} | {c['completed']}"
                     f"{' (truncated)' if c['truncated'] else ''} | {_f(c['images_per_s'], '.2f')} | "
                     f"{_f(c['latency_p50_s'], '.3f')} | {_f(c['latency_p95_s'], '.3f')} | "
                     f"{_f(c['latency_p99_s'], '.3f')} | {c['steps_run']} | {_f(c['evaluations_per_image'], '.2f')} | "
                     f"{c['errors']} |")
    if report["continuous_vs_static"]:
        lines += ["", "| B | continuous/static images/s | ideal (static batch max / mean evals) | measured / ideal "
                  "| static mean batch size | ideal with static's fill |", "|---|---|---|---|---|---|"]
        for r in report["continuous_vs_static"]:
            lines.append(f"| {r['batch']} | {r['measured']:.3f} | {r['ideal']:.3f} | {r['measured_over_ideal']:.3f} | "
                         f"{r['static_mean_batch_size']:.2f} | {r['ideal_with_fill']:.3f} |")
    return "\n".join(lines)


def results_block(report: dict, plot_name: str | None) -> str:
    m, s = report["machine"], report["settings"]
    text = (f"{START}\nCommand: `{report['command']}` — {report['date']}, git {report['git_commit']}.\n"
            f"Machine: {m['cpu']}, {m['cores']} CPU cores visible, torch {m['torch']} with {m['torch_threads']} "
            f"thread(s), load average at start {m['load_average_at_start']}; eager fp32 on the CPU.\n"
            f"Model: the shipped testbed checkpoint, {s['size']} px, LADR T={s['steps']}, cfg {s['cfg_used']}, "
            f"temperature {s['temperature']}; {s['requests']} requests (held-out prompts, seeds 0..N-1), "
            f"closed-loop clients {s['clients']}. Images equal across modes: {report['images_equal_across_modes']} "
            f"({report['images_compared']} requests compared).\n\n" + table(report) + "\n")
    if "rss" in report:
        r = report["rss"]
        text += (f"\nRSS over {r['completed']} requests through one continuous scheduler (B={r['batch']}, "
                 f"{r['size']}): {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB "
                 f"({r['growth_mib']:+.1f} MiB).\n")
    if plot_name:
        text += f"\n![serve load]({plot_name})\n"
    return text + END


def update_results(report: dict, path: Path, plot_name: str | None) -> None:
    replace_section(path, results_block(report, plot_name), START, END, "Serving load")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ladr_rt.fileio import atomic_write

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    colours = {"sequential": "tab:gray", "static": "tab:blue", "continuous": "tab:red"}
    for mode in ("sequential", "static", "continuous"):
        rows = sorted((c for c in report["configs"] if c["mode"] == mode and c["images_per_s"]),
                      key=lambda c: c["batch"])
        if not rows:
            continue
        bs = [c["batch"] for c in rows]
        a1.plot(bs, [c["images_per_s"] for c in rows], "o-", color=colours[mode], label=mode)
        a2.plot(bs, [c["latency_p50_s"] for c in rows], "o-", color=colours[mode], label=f"{mode} p50")
        a2.plot(bs, [c["latency_p99_s"] for c in rows], "s--", color=colours[mode], label=f"{mode} p99")
    for ax, yl in ((a1, "images / s"), (a2, "latency, submit -> result (s)")):
        ax.set_xlabel("batch size B (slots)")
        ax.set_ylabel(yl)
        ax.set_xticks(sorted({c["batch"] for c in report["configs"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"Serving load, testbed model, {m['cores']} cores, {m['torch_threads']} torch threads", fontsize=10)
    fig.tight_layout()
    atomic_write(path, fig.savefig)


def summary(report: dict) -> dict:
    return {"bench": "serve_load", "date": report["date"], "git_commit": report["git_commit"],
            "errors_total": report["errors_total"], "images_equal_across_modes": report["images_equal_across_modes"],
            "truncated_any": report["truncated_any"],
            "images_per_s": {f"{c['mode']}_B{c['batch']}": round(c["images_per_s"] or 0, 4) for c in report["configs"]},
            "latency_p99_s": {f"{c['mode']}_B{c['batch']}": round(c["latency_p99_s"] or 0, 4)
                              for c in report["configs"]},
            "continuous_vs_static": {str(r["batch"]): {"measured": round(r["measured"], 4),
                                                       "ideal": round(r["ideal"], 4),
                                                       "ideal_with_fill": round(r["ideal_with_fill"], 4)}
                                     for r in report["continuous_vs_static"]},
            "rss_growth_mib": round(report["rss"]["growth_mib"], 2) if "rss" in report else None}


def parse_args(argv=None):
    from ladr_rt.serve.scheduler import MODES

    def ints(s):
        return [int(x) for x in s.split(",") if x]

    def modes(s):
        out = [x for x in s.split(",") if x]
        bad = [x for x in out if x not in MODES]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
        return out

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory [default: the shipped testbed model]")
    ap.add_argument("--size", type=int, default=256, help="height = width in pixels")
    ap.add_argument("--prompt-budget", type=int, default=24)
    ap.add_argument("--batches", type=ints, default=[1, 4, 8], help="comma-separated batch sizes")
    ap.add_argument("--modes", type=modes, default=["sequential", "static", "continuous"])
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--clients", type=int, default=None, help="closed-loop client threads [default: 2*B]")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests per slot before timing")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop submitting after this, per configuration")
    ap.add_argument("--steps", type=int, default=None, help="LADR T [default: SamplerConfig's]")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale [default: the model's]")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-requests", type=int, default=0, help="RSS check over this many requests (0: skip)")
    ap.add_argument("--rss-batch", type=int, default=8)
    ap.add_argument("--rss-size", type=int, default=None, help="image side for the RSS check [default: --size]")
    ap.add_argument("--json", default=str(HERE / "results" / "serve_load.json"))
    ap.add_argument("--plot", default=None, help="PNG: images/s and p50/p99 per mode and B")
    ap.add_argument("--results", default=None, help="markdown file whose serve-load section is replaced")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.requests < 1 or any(b < 1 for b in args.batches) or args.warmup < 0:
        ap.error("--requests and --batches must be positive, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    from ladr_rt.fileio import atomic_write_text

    args = parse_args(argv)
    args.log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    m = machine(args.threads)
    args.log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
             f"load average {m['load_average_at_start']}")
    report = run(args)
    args.log("\n" + table(report))
    args.log(f"images equal across modes: {report['images_equal_across_modes']} "
             f"({report['images_compared']} requests compared)")
    for i, where in report["differing_detail"].items():
        groups: dict[str, list] = {}
        for w in where:
            groups.setdefault(w["digest"], []).append(f"{w['mode']} B={w['batch']} slot {w['slot']} "
                                                      f"({w['evaluations']} evals)")
        args.log(f"  request {i} differs: " + " | ".join("; ".join(v) for v in groups.values()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
    if args.results:
        update_results(report, Path(args.results), os.path.relpath(args.plot, Path(args.results).parent)
                       if args.plot else None)
    line = summary(report)
    print(json.dumps(line), flush=True)
    return report


if __name__ == "__main__":
    main()
