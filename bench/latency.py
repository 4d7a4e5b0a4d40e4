"""Latency suite: seconds per evaluation, per sampler step and per image, per backend.

    python bench/latency.py                 # CPU: tiny + ~30M configs, eager vs onnxruntime
    python bench/latency.py --quick         # fewer repeats (smoke run)

Per (config, backend): median seconds per evaluation after warm-up, median sampler-step
seconds (ladr, on that backend's logits), end-to-end seconds and evaluations for one image
(T steps, temperature 1), and the roofline: FLOPs per evaluation
(``ModelConfig.flops_per_eval``) over a measured fp32 matmul peak on the same threads.
Writes the full results as JSON (--out) and ends with one JSON line on stdout.
GPU rows (eager / torch-graph / onnxruntime-cuda / tensorrt at 8B) run only where CUDA is
present; elsewhere the JSON says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ladr_rt.config import ImageSpec, SamplerConfig
from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

CONFIGS = {
    # name: (model config, image spec). Weights are random: latency does not depend on them.
    "tiny": (tiny_config(), ImageSpec(64, 96, 32)),
    # ~31M parameters in the evaluated graph (8 blocks of d 512 / MLP 1536 = 27.3M, codebook head 4.2M)
    # plus the 134548 x 512 embedding that only feeds a Gather; tied head so the checkpoint stays small.
    "30m": (tiny_config(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536, weight_tying=True),
            ImageSpec(256, 256, 64)),
}
PROMPT = "a red circle above a blue square"


def median_time(fn, warmup: int, reps: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_peak(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """Measured matmul FLOP/s (fp32 on CPU; bf16 on CUDA, what engines run): the best of
    ``reps`` timings, since a peak is what the hardware can do, not what it usually does."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    c = torch.empty(n, n, device=device, dtype=dt)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm {'.'.join(map(str, torch.cuda.get_device_capability()))})"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def bench_pipeline(pipe, steps: int, warmup: int, reps: int) -> dict:
    from ladr_rt.samplers import make_sampler
    from ladr_rt.tokens import build_rows

    den = pipe.denoiser
    sync = torch.cuda.synchronize if den.device.type == "cuda" else (lambda: None)
    ids, mask = build_rows(pipe.tokenizer, [PROMPT], pipe.seq)
    pipe.ids.copy_(ids)
    pipe.key_mask.copy_(mask)
    eval_s = median_time(lambda: den(pipe.ids, pipe.key_mask, pipe.logits), warmup, reps, sync)
    # sampler step on this backend's logits, along a real run's first steps (state evolves)
    scfg = SamplerConfig(name="ladr", steps=steps, temperature=1.0, seed=0)
    state = pipe._state(steps)
    state.reset(0)
    sampler = make_sampler(scfg, state)
    step_ts = []
    for _ in range(min(steps - 1, max(reps, 3))):
        sync()
        t0 = time.perf_counter()
        sampler.step(pipe.logits)
        sync()
        step_ts.append(time.perf_counter() - t0)
    pipe.generate_codes(PROMPT, scfg)  # warm-up run
    runs = [pipe.generate_codes(PROMPT, scfg) for _ in range(max(1, reps // 4))]
    e2e = statistics.median(r[3] for r in runs)
    return {"eval_s": eval_s, "sampler_step_s": statistics.median(step_ts), "end_to_end_s": e2e,
            "evaluations_per_image": runs[0][2], "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,30m", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (CPU)")
    ap.add_argument("--steps", type=int, default=16, help="T for the end-to-end run")
    ap.add_argument("--reps", type=int, default=20, help="timed repeats per evaluation measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 repeats, 4 steps: a smoke run")
    ap.add_argument("--out", default="bench/results/latency_cpu.json", help="JSON results file")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.steps, a.warmup = 3, 4, 1
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    from ladr_rt.build import BuildOptions, build
    from ladr_rt.engines.ort import OrtDenoiser
    from ladr_rt.pipeline import LadrPipeline

    peak = matmul_peak(dev)
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ladr-bench-") as tmp:
        for name in a.configs.split(","):
            cfg, spec = CONFIGS[name]
            ckpt = write_tiny_checkpoint(Path(tmp) / name, cfg, seed=0)
            build(BuildOptions(model=str(ckpt), out=str(Path(tmp) / f"{name}-eng"), height=spec.height,
                               width=spec.width, prompt_budget=spec.prompt_budget, precision="fp32"),
                  log=lambda s: print(s, file=sys.stderr), device="cpu")
            eager = LadrPipeline.from_pretrained(ckpt, spec.height, spec.width, spec.prompt_budget)
            ort = LadrPipeline.from_engine(Path(tmp) / f"{name}-eng", device="cpu")
            ort.denoiser = OrtDenoiser(ort.denoiser.path, "cpu", threads=a.threads)  # same thread count as torch
            L, N = eager.seq.seq_len, eager.seq.n_image
            flops = cfg.flops_per_eval(L, N, batch=2)
            n_params = sum(p.numel() for p in eager.denoiser.model.parameters())
            for backend, pipe in (("eager", eager), ("onnxruntime-cpu", ort)):
                r = bench_pipeline(pipe, a.steps, a.warmup, a.reps)
                r.update(config=name, backend=backend, device="cpu", seq_len=L, n_image=N, rows=2,
                         params=n_params, flops_per_eval=flops, roofline_s=flops / peak,
                         roofline_fraction=flops / peak / r["eval_s"])
                rows.append(r)
                print(f"{name:5s} {backend:16s} L={L:4d} N={N:4d}  eval {r['eval_s'] * 1e3:8.2f} ms  step "
                      f"{r['sampler_step_s'] * 1e3:7.2f} ms  image {r['end_to_end_s']:6.3f} s / "
                      f"{r['evaluations_per_image']} evals  roofline {r['roofline_s'] * 1e3:7.2f} ms "
                      f"({100 * r['roofline_fraction']:.0f}% of peak)", file=sys.stderr)
    ratios = {}
    for name in a.configs.split(","):
        e = next(r for r in rows if r["config"] == name and r["backend"] == "eager")
        o = next(r for r in rows if r["config"] == name and r["backend"] == "onnxruntime-cpu")
        ratios[name] = {"eval_eager_over_ort": e["eval_s"] / o["eval_s"],
                        "end_to_end_eager_over_ort": e["end_to_end_s"] / o["end_to_end_s"]}
    gpu = ("not run: no CUDA device on this machine" if not torch.cuda.is_available() else
           "CUDA present but GPU rows (8B random weights, 512^2/1024^2, eager/torch-graph/onnxruntime-cuda/tensorrt) "
           "are not implemented in this script yet")
    result = {
        "bench": "latency", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(dev),
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "threads": a.threads,
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "matmul_peak_flops": peak, "matmul_peak_note": "fp32 1024^3 torch.mm, best of 20, same threads",
        "load_before": os.getloadavg(),
        "rows": rows, "eager_over_ort": ratios, "gpu": gpu, "total_s": time.perf_counter() - t_start,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"roofline: FLOPs/eval over a measured {peak / 1e9:.1f} GFLOP/s fp32 matmul peak ({hardware(dev)})",
          file=sys.stderr)
    print(json.dumps({"bench": "latency", "out": str(out), "eager_over_ort": ratios, "gpu": gpu,
                      "total_s": round(result["total_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
