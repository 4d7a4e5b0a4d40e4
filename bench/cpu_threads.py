"""The CPU thread choice under a busy neighbour: the shipped model's sampling time with the
runtime's own choice, with one thread, and with torch's default count, while a busy-loop
process spins beside it.

    python bench/cpu_threads.py --rounds 9 --json bench/results/cpu_threads.json

The three pipelines take turns within every round, so the machine's other load (these VMs are
shared) falls on all of them alike; medians after ``--warmup`` rounds. The bar: the runtime's
choice within 2x of the one-thread time.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_study import cpu_name  # noqa: E402  (one reading of the CPU model for every bench)

BUSY = "while True: pass"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompt", default="two red circles above a blue square")
    ap.add_argument("--no-busy", action="store_true", help="measure without the busy-loop neighbour")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args(argv)
    if a.rounds <= a.warmup:
        ap.error("--rounds must exceed --warmup")
    if any(os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        ap.error("unset OMP_NUM_THREADS/MKL_NUM_THREADS: the runtime's own choice is what this measures")

    import torch

    from ladr_rt import threads
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline

    default = torch.get_num_threads()
    pipes = {"runtime choice": LadrPipeline.from_pretrained(None),
             "1 thread": LadrPipeline.from_pretrained(None, cpu_threads=1),
             f"torch default ({default} threads)": LadrPipeline.from_pretrained(None, cpu_threads=default)}
    chosen = threads.choose(pipes["runtime choice"]._matmul_flops)
    busy = None if a.no_busy else subprocess.Popen([sys.executable, "-c", BUSY])
    times: dict[str, list[float]] = {k: [] for k in pipes}
    try:
        time.sleep(0.5)  # the neighbour is spinning before the first run
        for r in range(a.rounds):
            for name, pipe in pipes.items():
                times[name].append(pipe(a.prompt, SamplerConfig(seed=0)).seconds)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    med = {k: statistics.median(v[a.warmup:]) for k, v in times.items()}
    one = med["1 thread"]
    report = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/cpu_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}",
        "load_average_after": os.getloadavg(),
        "busy_neighbour": busy is not None,
        "runtime_choice_threads": chosen,
        "median_sampling_seconds": med,
        "ratio_to_1_thread": {k: v / one for k, v in med.items()},
        "all_seconds": times,
        "bar_runtime_within_2x_of_1_thread": med["runtime choice"] <= 2 * one,
    }
    print(json.dumps({k: report[k] for k in ("date", "machine", "load_average_after", "runtime_choice_threads",
                                             "median_sampling_seconds", "ratio_to_1_thread",
                                             "bar_runtime_within_2x_of_1_thread")}, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
