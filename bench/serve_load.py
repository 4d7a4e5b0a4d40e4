"""Serving load benchmark: real ``ladr-rt serve`` processes under closed-loop HTTP clients on loopback.

    python bench/serve_load.py --rss-requests 1000 --results bench/RESULTS.md --plot bench/serve_load.png

Per configuration (mode x batch size B; sequential at B = 1, static and continuous at every
``--batches``) one ``ladr-rt serve`` subprocess on 127.0.0.1 (port 0) over the shipped testbed
model (eager, CPU, fp32, LADR, the model's default cfg, temperature 1). ``--clients`` threads
(default 2·B), each with its own keep-alive HTTP connection, work through one fixed request list
(``--requests`` held-out testbed prompts, seeds 0..N-1, the same list everywhere), each waiting
for its response before sending the next (closed loop). Latency is the client's: POST to parsed
response, so it includes HTTP, queueing, the steps, VQ decode and PNG encoding. Timing starts
after ``--warmup`` requests per slot (other seeds); submission stops after ``--max-seconds``.

The configurations of one B run in ``--rounds`` interleaved rounds (the order rotates each
round, every server stays up), so a drift in the shared machine's speed lands on all of them
alike; per configuration the median round is reported and latencies are pooled.

Per round: images/s, latency percentiles, errors by kind, the server's steps (``/metrics``'
``ladr_rt_steps_total``) and each image's evaluations (from the response). Continuous vs static
at each B, per round and as the median over rounds:

* ``measured``: continuous images/s / static images/s;
* ``ideal``: from the round's own evaluation counts: static's steps (each batch runs to its
  slowest request, partly filled batches included) over the fewest a continuous batch could
  take for the same images, sum(evaluations) / B;
* ``steps_ratio``: static's steps / continuous's steps (continuous also pays its tail, when the
  list runs out and slots fall idle), and ``step_time_ratio``: seconds per step, continuous over
  static (1 when a step costs the same in both modes).

Every response's PNG is hashed; ``images_equal`` says whether each request gave the same bytes
in every configuration and round.

``--rss-requests N``: the resident memory (/proc/PID/statm) of the continuous B = ``--rss-batch``
server, idle, after a warm-up and after every ``--rss-chunk`` of N more requests, with the
least-squares slope over the second half (MiB per 1000 requests): a leak grows linearly.

Outputs: a table on stdout, ``--json`` (everything, per request included), ``--plot``
(optional), the ``serve-load`` section of ``--results`` (optional) and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark's helpers, however this file is loaded
from sampler_study import cpu_name, git_commit, replace_section  # noqa: E402

from ladr_rt.fileio import Interrupted, signals_unwind  # noqa: E402

START, END = "<!-- serve-load:start -->", "<!-- serve-load:end -->"
MiB = 1 << 20
ROUTE = "/v1/images/generations"


def machine(threads: int) -> dict:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "server_torch_threads": threads,
            "load_average_at_start": load, "python": platform.python_version(), "platform": platform.platform()}


def request_list(n: int, seed0: int = 0) -> list[tuple[str, int]]:
    """(prompt, seed): held-out testbed prompts in ``eval_items`` order (cycled), seeds seed0..seed0+n-1."""
    from ladr_testbed import eval_items

    items = eval_items(8)
    return [(items[i % len(items)].prompt, seed0 + i) for i in range(n)]


def percentile(xs, q) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


# ---------------------------------------------------------------------------------------------- the server


class ServerFailed(RuntimeError):
    pass


class Server:
    """One ``ladr-rt serve`` subprocess on loopback; its stderr is drained by a thread (the
    last lines kept for an error message)."""

    def __init__(self, mode: str, batch: int, args, max_queue: int):
        cmd = [sys.executable, "-m", "ladr_rt.cli", "serve", "--mode", mode, "--host", "127.0.0.1", "--port", "0",
               "--max-queue", str(max_queue), "--height", str(args.size), "--width", str(args.size),
               "--prompt-budget", str(args.prompt_budget), "--temperature", str(args.temperature), "--device", "cpu",
               "--sampler", "ladr"]
        if mode != "sequential":
            cmd += ["--batch", str(batch)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if args.cfg is not None:
            cmd += ["--cfg", str(args.cfg)]
        if args.model:
            cmd += ["--model", args.model]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        self.mode, self.batch, self.cmd = mode, batch, cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._events: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._wait_ready(args.start_timeout)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines = (self.lines + [line.rstrip()])[-20:]
            self._events.put(line)
        self._events.put(None)

    def _wait_ready(self, timeout: float) -> str:
        deadline, url = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                line = self._events.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if "listening on http://" in line:
                url = line.split("listening on ", 1)[1].split()[0]
            if "ready: http://" in line and url:
                return url
        self.close()
        raise ServerFailed(f"`{' '.join(self.cmd[2:])}` did not become ready: " + " | ".join(self.lines[-5:]))

    def metrics(self, client) -> dict[str, float]:
        text = client.get(self.url + "/metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, v = line.partition(" ")
                out[name] = float(v)
        return out

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------- clients


def post(client, url: str, prompt: str, seed: int) -> dict:
    """One request; a row with the response's numbers and the PNG's digest, or raises."""
    t0 = time.perf_counter()
    r = client.post(url + ROUTE, json={"prompt": prompt, "seed": seed, "n": 1, "response_format": "b64_json"})
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    d = r.json()["data"][0]
    t1 = time.perf_counter()
    return {"latency_s": t1 - t0, "evaluations": d["evaluations"], "run_s": d["seconds"],
            "queued_s": d["queued_seconds"],
            "digest": hashlib.sha256(base64.b64decode(d["b64_json"])).hexdigest()[:16]}


class Load:
    """Closed-loop clients: each takes the next request index, posts it and waits for the
    response before taking another."""

    def __init__(self, url: str, requests, clients: int, max_seconds: float | None, keep: bool = True,
                 on_done=None):
        self.url, self.requests, self.clients, self.max_seconds = url, requests, clients, max_seconds
        self.keep, self.on_done = keep, on_done
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
        import httpx

        with httpx.Client(timeout=600) as client:
            while (i := self._take(deadline)) is not None:
                prompt, seed = self.requests[i]
                try:
                    row = post(client, self.url, prompt, seed)
                except Exception as e:  # counted, never raised: the run reports errors == 0 or not
                    name = str(e).split(":")[0] if isinstance(e, RuntimeError) else type(e).__name__
                    with self.lock:
                        self.errors[name] = self.errors.get(name, 0) + 1
                        self.error_examples.setdefault(name, str(e)[:300])
                    continue
                with self.lock:
                    self.done += 1
                    if self.keep:
                        self.rows[i] = row
                    if self.on_done is not None:
                        self.on_done(self.done)

    def run(self) -> float:
        """Wall seconds from the first submission to the last response."""
        t0 = time.perf_counter()
        deadline = None if self.max_seconds is None else t0 + self.max_seconds
        threads = [threading.Thread(target=self._client, args=(deadline,), daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0


def warm_up(url: str, n: int) -> None:
    """``n`` requests outside the measured list (other seeds), all at once, to fill every slot."""
    if n > 0:
        load = Load(url, request_list(n, seed0=10**9), n, None, keep=False)
        load.run()
        if load.errors:
            raise ServerFailed(f"warm-up failed: {load.error_examples}")


# ---------------------------------------------------------------------------------------------- one round


def run_round(server: Server, requests, clients: int, args, client) -> dict:
    steps0 = server.metrics(client)["ladr_rt_steps_total"]
    load = Load(server.url, requests, clients, args.max_seconds)
    wall = load.run()
    steps = int(server.metrics(client)["ladr_rt_steps_total"] - steps0)
    rows = load.rows
    lat = [r["latency_s"] for r in rows.values()]
    evals = [r["evaluations"] for r in rows.values()]
    n = len(rows)
    return {"completed": n, "submitted": load.next, "truncated": load.truncated, "wall_s": wall,
            "images_per_s": n / wall if wall > 0 else None, "latency_p50_s": percentile(lat, 50),
            "latency_p99_s": percentile(lat, 99), "errors": sum(load.errors.values()),
            "errors_by_type": load.errors, "error_examples": load.error_examples, "steps_run": steps,
            "evaluations_total": int(sum(evals)), "seconds_per_step": wall / steps if steps else None,
            "per_request": {str(i): rows[i] for i in sorted(rows)}}


def summarise(mode: str, B: int, clients: int, rounds: list[dict]) -> dict:
    """One configuration over its rounds: the median round's images/s, pooled latencies."""
    lat = [r["latency_s"] for rd in rounds for r in rd["per_request"].values()]
    evals = [r["evaluations"] for rd in rounds for r in rd["per_request"].values()]
    ips = [rd["images_per_s"] for rd in rounds if rd["images_per_s"]]
    errors: dict[str, int] = {}
    for rd in rounds:
        for k, v in rd["errors_by_type"].items():
            errors[k] = errors.get(k, 0) + v
    return {"mode": mode, "batch": B, "clients": clients, "rounds": len(rounds),
            "completed": sum(rd["completed"] for rd in rounds), "truncated": any(rd["truncated"] for rd in rounds),
            "images_per_s": float(np.median(ips)) if ips else None, "images_per_s_rounds": ips,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "latency_p99_s": percentile(lat, 99), "latency_mean_s": float(np.mean(lat)) if lat else None,
            "queued_p50_s": percentile([r["queued_s"] for rd in rounds for r in rd["per_request"].values()], 50),
            "errors": sum(errors.values()), "errors_by_type": errors,
            "steps_run": int(np.median([rd["steps_run"] for rd in rounds])),
            "evaluations_per_image": float(np.mean(evals)) if evals else None,
            "seconds_per_step": float(np.median([rd["seconds_per_step"] for rd in rounds if rd["seconds_per_step"]]))
            if any(rd["seconds_per_step"] for rd in rounds) else None,
            "round_detail": rounds}


def compare(st: dict, co: dict, B: int) -> dict:
    """Continuous vs static at one B, round by round (round r of each ran back to back)."""
    per = []
    for a, b in zip(st["round_detail"], co["round_detail"]):
        if not (a["images_per_s"] and b["images_per_s"] and a["completed"] and a["steps_run"] and b["steps_run"]):
            continue
        ideal = a["steps_run"] * B / a["evaluations_total"]
        measured = b["images_per_s"] / a["images_per_s"]
        per.append({"measured": measured, "ideal": ideal, "measured_over_ideal": measured / ideal,
                    "steps_ratio": a["steps_run"] / b["steps_run"],
                    "step_time_ratio": b["seconds_per_step"] / a["seconds_per_step"],
                    "static_steps": a["steps_run"], "continuous_steps": b["steps_run"],
                    "continuous_min_steps": b["evaluations_total"] / B})
    if not per:
        return {"batch": B, "rounds": []}
    med = {k: float(np.median([p[k] for p in per])) for k in
           ("measured", "ideal", "measured_over_ideal", "steps_ratio", "step_time_ratio")}
    return {"batch": B, **med, "rounds": per}


def wait_idle(server: Server, client, timeout: float = 60.0) -> None:
    """Until the server has no request running or waiting, and its decode thread's idle trim ran."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics(client)
        if m["ladr_rt_busy_slots"] == 0 and m["ladr_rt_queue_depth"] == 0:
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise ServerFailed(f"the server did not go idle within {timeout:.0f} s")


def rss_run(server: Server, args, client) -> dict:
    """The server's RSS, idle, after a warm-up and after every ``args.rss_chunk`` of
    ``args.rss_requests`` more requests (closed loop within a chunk). Sampled idle so the
    number is the memory the server keeps, not a step's transient tensors."""
    B = server.batch
    clients = args.clients or 2 * B
    warm_up(server.url, max(args.warmup, 1) * B * 2)
    wait_idle(server, client)
    before = server.rss_bytes()
    samples, done, errors, wall = [], 0, {}, 0.0
    reqs = request_list(args.rss_requests, seed0=2 * 10**9)
    while done < len(reqs):
        chunk = reqs[done:done + args.rss_chunk]
        load = Load(server.url, chunk, clients, None, keep=False)
        wall += load.run()
        for k, v in load.errors.items():
            errors[k] = errors.get(k, 0) + v
        done += len(chunk)
        wait_idle(server, client)
        samples.append({"requests": done, "rss_mib": server.rss_bytes() / MiB})
    after = server.rss_bytes()
    half = [s for s in samples if s["requests"] > args.rss_requests / 2]
    slope = None
    if len(half) >= 3:
        x = np.array([s["requests"] for s in half], dtype=float)
        y = np.array([s["rss_mib"] for s in half])
        slope = float(np.polyfit(x, y, 1)[0] * 1000)
    rss = [s["rss_mib"] for s in samples]
    return {"requests": args.rss_requests, "completed": args.rss_requests - sum(errors.values()), "batch": B,
            "mode": server.mode, "size": f"{args.size}x{args.size}", "clients": clients, "chunk": args.rss_chunk,
            "wall_s": wall, "errors": sum(errors.values()), "errors_by_type": errors,
            "rss_before_mib": before / MiB, "rss_after_mib": after / MiB, "growth_mib": (after - before) / MiB,
            "rss_min_mib": min(rss) if rss else None, "rss_max_mib": max(rss) if rss else None,
            "second_half_slope_mib_per_1000": slope, "samples": samples}


# ---------------------------------------------------------------------------------------------- the run


def run(args) -> dict:
    import httpx

    requests = request_list(args.requests)
    groups: list[tuple[int, list[str]]] = []  # (B, modes), the configurations that alternate
    if "sequential" in args.modes:
        groups.append((1, ["sequential"] + [m for m in args.modes if m != "sequential" and 1 in args.batches]))
    for B in args.batches:
        if B == 1 and groups:
            continue
        ms = [m for m in args.modes if m != "sequential"]
        if ms:
            groups.append((B, ms))
    report = {"command": " ".join(["python bench/serve_load.py"] + [shlex.quote(a) for a in sys.argv[1:]]),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(args.threads),
              "git_commit": git_commit(), "model": args.model or "shipped testbed model",
              "settings": {"size": f"{args.size}x{args.size}", "prompt_budget": args.prompt_budget, "sampler": "ladr",
                           "steps": args.steps, "cfg": args.cfg, "temperature": args.temperature,
                           "requests": args.requests, "clients": args.clients or "2*B", "warmup_per_slot": args.warmup,
                           "rounds": args.rounds, "max_seconds": args.max_seconds, "batches": args.batches,
                           "modes": args.modes, "transport": "HTTP/1.1 on 127.0.0.1, one keep-alive connection per client",
                           "server": "ladr-rt serve subprocess, eager fp32 on the CPU",
                           "request_list_sha": hashlib.sha256(json.dumps(requests).encode()).hexdigest()[:16]},
              "configs": [], "continuous_vs_static": []}
    rss_server = None
    with httpx.Client(timeout=60) as client:
        for B, modes in groups:
            clients = args.clients or 2 * B
            servers = {}
            try:
                for m in modes:
                    servers[m] = Server(m, B, args, max_queue=max(64, 2 * clients))
                    warm_up(servers[m].url, args.warmup * B)
                rounds: dict[str, list[dict]] = {m: [] for m in modes}
                for r in range(args.rounds):
                    order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate: no mode always goes first
                    for m in order:
                        rd = run_round(servers[m], requests, clients, args, client)
                        rd["round"], rd["position"] = r, order.index(m)
                        rounds[m].append(rd)
                        args.log(f"{m:10s} B={B:<2d} round {r}: {rd['completed']:4d} images  "
                                 f"{rd['images_per_s'] or 0:6.2f} img/s  p50 {rd['latency_p50_s'] or 0:.3f} s  "
                                 f"steps {rd['steps_run']}  errors {rd['errors']}"
                                 + ("  TRUNCATED" if rd["truncated"] else ""))
                for m in modes:
                    report["configs"].append(summarise(m, B, clients, rounds[m]))
                if "static" in modes and "continuous" in modes:
                    st, co = (next(c for c in report["configs"] if c["mode"] == m and c["batch"] == B)
                              for m in ("static", "continuous"))
                    report["continuous_vs_static"].append(compare(st, co, B))
                if args.rss_requests and B == args.rss_batch and "continuous" in servers:
                    rss_server = servers.pop("continuous")
                    report["rss"] = rss_run(rss_server, args, client)
            finally:
                for s in servers.values():
                    s.close()
                if rss_server is not None:
                    rss_server.close()
                    rss_server = None
        if args.rss_requests and "rss" not in report:  # --rss-batch is not among --batches
            s = Server("continuous", args.rss_batch, args, max_queue=64)
            try:
                report["rss"] = rss_run(s, args, client)
            finally:
                s.close()
    if "rss" in report:
        r = report["rss"]
        args.log(f"RSS over {r['completed']} requests ({r['mode']} B={r['batch']}, {r['size']}): "
                 f"{r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB ({r['growth_mib']:+.1f} MiB)")
    # Images equal: every request gave one PNG whatever configuration and round served it.
    seen: dict[str, set] = {}
    count: dict[str, int] = {}
    for c in report["configs"]:
        for rd in c["round_detail"]:
            for i, row in rd["per_request"].items():
                seen.setdefault(i, set()).add(row["digest"])
                count[i] = count.get(i, 0) + 1
    compared = [i for i in seen if count[i] > 1]
    report["images_compared"] = len(compared)
    report["images_differing"] = sorted((i for i in compared if len(seen[i]) > 1), key=int)
    report["images_equal"] = (not report["images_differing"]) if compared else None  # None: nothing ran twice
    report["errors_total"] = sum(c["errors"] for c in report["configs"]) + report.get("rss", {}).get("errors", 0)
    report["truncated_any"] = any(c["truncated"] for c in report["configs"])
    return report


# ---------------------------------------------------------------------------------------------- output


def _f(x, fmt) -> str:
    return "-" if x is None else format(x, fmt)


def table(report: dict) -> str:
    lines = ["| mode | B | clients | images (all rounds) | images/s (median round) | p50 s | p95 s | p99 s | "
             "steps per round | s per step | evals/image | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["configs"]:
        lines.append(f"| {c['mode']} | {c['batch']} | {c['clients']} | {c['completed']}"
                     f"{' (truncated)' if c['truncated'] else ''} | {_f(c['images_per_s'], '.2f')} | "
                     f"{_f(c['latency_p50_s'], '.3f')} | {_f(c['latency_p95_s'], '.3f')} | "
                     f"{_f(c['latency_p99_s'], '.3f')} | {c['steps_run']} | {_f(c['seconds_per_step'], '.4f')} | "
                     f"{_f(c['evaluations_per_image'], '.2f')} | {c['errors']} |")
    cmp = [r for r in report["continuous_vs_static"] if r["rounds"]]
    if cmp:
        lines += ["", "| B | continuous/static images/s | ideal (static steps / (sum evals / B)) | measured / ideal "
                  "| static/continuous steps | s per step, continuous/static | rounds |",
                  "|---|---|---|---|---|---|---|"]
        for r in cmp:
            lines.append(f"| {r['batch']} | {r['measured']:.3f} | {r['ideal']:.3f} | {r['measured_over_ideal']:.3f} | "
                         f"{r['steps_ratio']:.3f} | {r['step_time_ratio']:.3f} | {len(r['rounds'])} |")
    return "\n".join(lines)


def rss_line(r: dict) -> str:
    slope = r["second_half_slope_mib_per_1000"]
    return (f"RSS of the {r['mode']} B={r['batch']} server over {r['completed']} requests ({r['size']}, "
            f"{r['clients']} clients, {r['errors']} errors): {r['rss_before_mib']:.1f} -> {r['rss_after_mib']:.1f} MiB "
            f"({r['growth_mib']:+.1f} MiB); idle samples after every {r['chunk']} requests ranged "
            f"{_f(r['rss_min_mib'], '.1f')}–{_f(r['rss_max_mib'], '.1f')} MiB; least-squares slope over the second "
            f"half {_f(slope, '+.1f')} MiB per 1000 requests.")


def results_block(report: dict, plot_name: str | None) -> str:
    m, s = report["machine"], report["settings"]
    text = (f"{START}\nCommand: `{report['command']}` — {report['date']}, git {report['git_commit']}.\n"
            f"Machine: {m['cpu']}, {m['cores']} CPU cores visible, torch {m['torch']}, servers with "
            f"{m['server_torch_threads']} torch thread(s), load average at start {m['load_average_at_start']}.\n"
            f"Servers: `ladr-rt serve` subprocesses (eager fp32 CPU), the shipped testbed model, {s['size']} px, LADR, "
            f"temperature {s['temperature']}; clients: {s['requests']} requests per round (held-out prompts, seeds "
            f"0..N-1), {s['rounds']} interleaved rounds, closed loop, {s['clients']} clients over HTTP on loopback. "
            f"Images equal across every configuration and round: {report['images_equal']} "
            f"({report['images_compared']} requests compared). Errors: {report['errors_total']}.\n\n"
            + table(report) + "\n")
    if "rss" in report:
        text += "\n" + rss_line(report["rss"]) + "\n"
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
    for ax, yl in ((a1, "images / s (median round)"), (a2, "latency, HTTP request -> response (s)")):
        ax.set_xlabel("batch size B (slots)")
        ax.set_ylabel(yl)
        ax.set_xticks(sorted({c["batch"] for c in report["configs"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"ladr-rt serve under load, testbed model, {m['cores']} cores, {report['date']}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, fig.savefig)


def summary(report: dict) -> dict:
    return {"bench": "serve_load", "date": report["date"], "git_commit": report["git_commit"],
            "errors_total": report["errors_total"], "images_equal": report["images_equal"],
            "truncated_any": report["truncated_any"],
            "images_per_s": {f"{c['mode']}_B{c['batch']}": round(c["images_per_s"] or 0, 4) for c in report["configs"]},
            "latency_p50_s": {f"{c['mode']}_B{c['batch']}": round(c["latency_p50_s"] or 0, 4)
                              for c in report["configs"]},
            "latency_p99_s": {f"{c['mode']}_B{c['batch']}": round(c["latency_p99_s"] or 0, 4)
                              for c in report["configs"]},
            "continuous_vs_static": {str(r["batch"]): {k: round(r[k], 4) for k in
                                                       ("measured", "ideal", "measured_over_ideal", "steps_ratio")}
                                     for r in report["continuous_vs_static"] if r["rounds"]},
            "rss_growth_mib": round(report["rss"]["growth_mib"], 2) if "rss" in report else None,
            "rss_second_half_slope_mib_per_1000": (None if "rss" not in report or
                                                   report["rss"]["second_half_slope_mib_per_1000"] is None
                                                   else round(report["rss"]["second_half_slope_mib_per_1000"], 2))}


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
    ap.add_argument("--requests", type=int, default=96, help="requests per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--clients", type=int, default=None, help="closed-loop clients [default: 2*B]")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up requests per slot before timing")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop submitting after this, per round")
    ap.add_argument("--steps", type=int, default=None, help="LADR T [default: the server's]")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale [default: the model's]")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per server")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds a server may take to be ready")
    ap.add_argument("--rss-requests", type=int, default=0, help="RSS check over this many requests (0: skip)")
    ap.add_argument("--rss-batch", type=int, default=8)
    ap.add_argument("--rss-chunk", type=int, default=100, help="requests between idle RSS samples")
    ap.add_argument("--json", default=str(HERE / "results" / "serve_load.json"))
    ap.add_argument("--plot", default=None, help="PNG: images/s and p50/p99 per mode and B")
    ap.add_argument("--results", default=None, help="markdown file whose serve-load section is replaced")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or any(b < 1 for b in args.batches) or args.warmup < 0:
        ap.error("--requests, --rounds and --batches must be positive, --warmup >= 0")
    for flag, v in (("--clients", args.clients), ("--threads", args.threads), ("--rss-batch", args.rss_batch),
                    ("--rss-chunk", args.rss_chunk), ("--size", args.size), ("--prompt-budget", args.prompt_budget)):
        if v is not None and v < 1:  # 0 clients would time nothing; a 0 chunk would never end
            ap.error(f"{flag} must be >= 1, got {v}")
    if args.rss_requests < 0:
        ap.error(f"--rss-requests must be >= 0 (0: skip the RSS check), got {args.rss_requests}")
    for flag, v in (("--max-seconds", args.max_seconds), ("--start-timeout", args.start_timeout)):
        if not v > 0:
            ap.error(f"{flag} must be > 0 seconds, got {v}")
    return args


class BenchInterrupted(Interrupted):
    def __init__(self, signum: int):
        super().__init__(signum, "serve_load")


def main(argv=None) -> dict:
    args = parse_args(argv)
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every started server is closed by the finally blocks.
    try:
        with signals_unwind(BenchInterrupted):
            return _main(args)
    except BenchInterrupted as e:
        print(e.message("every server it started was stopped; no results were written"), file=sys.stderr)
        raise


def _main(args) -> dict:
    from ladr_rt.fileio import atomic_write_text

    args.log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    m = machine(args.threads)
    args.log(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average {m['load_average_at_start']}")
    try:
        report = run(args)
    except ServerFailed as e:
        sys.exit(f"serve_load: {e}")
    args.log("\n" + table(report))
    args.log(f"images equal across configurations and rounds: {report['images_equal']} "
             f"({report['images_compared']} requests compared; differing: {report['images_differing'][:10]})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, Path(args.plot))
    if args.results:
        update_results(report, Path(args.results), os.path.relpath(args.plot, Path(args.results).parent)
                       if args.plot else None)
    print(json.dumps(summary(report)), flush=True)
    return report


if __name__ == "__main__":
    main()
