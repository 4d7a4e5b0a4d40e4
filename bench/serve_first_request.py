"""A fresh server's first requests, with and without the warm-up `ladr-rt serve` runs before ready.

    python bench/serve_first_request.py --pairs 2 [--threads 1]

Per pair, two ``ladr-rt serve --port 0 --device cpu`` processes one after the other (shipped
testbed model, its defaults): ``cold`` with ``ladr_rt.serve.server.warm_up`` replaced by a no-op
in the server process, then ``warm`` as shipped. Each, once its ``ready:`` line is out, gets the
same request ``--requests`` times in a row (same prompt and seed: the same work each time); the
client's seconds per request are printed, one JSON line per server, then a summary line.
``--threads`` sets OMP_NUM_THREADS for the servers (default: unset, torch's default).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sampler_study import cpu_name, git_commit  # noqa: E402

PROMPT = "two red circles above a blue square"


def one_server(mode: str, threads: str | None, requests: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    code = ("import sys\nimport ladr_rt.serve.server as s\n"
            + ("s.warm_up = lambda sched: 0.0\n" if mode == "cold" else "")
            + "from ladr_rt.cli import main\nmain(['serve', '--port', '0', '--device', 'cpu'])\n")
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
    port = None
    try:
        for line in p.stderr:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = port or (m and int(m.group(1)))
            if "ready:" in line:
                break
        else:
            raise SystemExit(f"the {mode} server exited before it was ready")
        ready = time.monotonic() - t0
        secs = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:
            for _ in range(requests):
                t = time.perf_counter()
                r = c.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 0})
                secs.append(round(time.perf_counter() - t, 3))
                r.raise_for_status()
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(60)
    return {"mode": mode, "ready_s": round(ready, 2), "requests_s": secs, "load_avg_1m": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--threads", default=None, help="OMP_NUM_THREADS for the servers (default: unset)")
    a = ap.parse_args()
    rows = []
    for _ in range(a.pairs):
        for mode in ("cold", "warm"):
            rows.append(one_server(mode, a.threads, a.requests))
            print(json.dumps(rows[-1]), flush=True)
    first = {m: [r["requests_s"][0] for r in rows if r["mode"] == m] for m in ("cold", "warm")}
    later = {m: [s for r in rows if r["mode"] == m for s in r["requests_s"][1:]] for m in ("cold", "warm")}
    print(json.dumps({"date": dt.date.today().isoformat(), "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
                      "git_commit": git_commit(), "threads": a.threads or "default",
                      "first_s": first, "median_later_s": {m: statistics.median(v) for m, v in later.items()}}))


if __name__ == "__main__":
    main()
