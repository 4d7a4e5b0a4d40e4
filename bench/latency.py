"""Latency suite: seconds per evaluation, per sampler step and per image, per backend.

    python bench/latency.py                 # CPU: tiny + ~30M configs, eager vs onnxruntime
    python bench/latency.py --quick         # fewer repeats (smoke run)

Per (config, backend): median seconds per evaluation after warm-up, median sampler-step
seconds (ladr, on that backend's logits), end-to-end seconds and evaluations for one image
(T steps, temperature 1), and the roofline: FLOPs per evaluation
(``ModelConfig.flops_per_eval``) over a measured fp32 matmul peak on the same threads.
Writes the full results as JSON (--out) and ends with one JSON line on stdout.
GPU rows (official-style / eager / torch-graph / onnxruntime-cuda / tensorrt at 8B) run only
where CUDA is present; elsewhere the JSON says so.

    python3 bench/latency.py --gpu          # GPU: the 8B DiMOO config, random bf16 weights, 512^2 and 1024^2
    python3 bench/latency.py --gpu --device cpu --gpu-model tiny --resolutions 64x96 --prompt-budget 32
                                            # the same code path on the CPU at tiny size (a smoke run)

The GPU suite (``run_gpu_suite``) builds the model with seeded random weights directly on the
device (no checkpoint), times every backend through the ``Denoiser`` call signature with
CUDA events, and writes ``bench/results/latency_gpu.json`` (--gpu-out) row by row, so a run
cut short still leaves what it measured. The ``official`` row evaluates as the official
generator does (two batch-1 forwards of their own lengths, full-vocabulary logits, a host read
per step) and is the reference of ``speedup_vs_official``. ``bench/gpu_check.py`` runs this
suite as stage 2 of the one-command GPU check. Without --gpu on a machine with CUDA, the CPU suite
runs first and the GPU suite after it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout (no pip install)

from ladr_rt.config import ImageSpec, ModelConfig, SamplerConfig  # noqa: E402
from ladr_rt.tiny import tiny_config, write_tiny_checkpoint  # noqa: E402

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


# ---------------------------------------------------------------------------------------------
# GPU suite: the full DiMOO config with random weights, device-agnostic so that it can be
# smoke-tested on the CPU at tiny size (tests/test_bench_latency.py). Nothing here writes a
# checkpoint or needs a tokenizer, a VQ decoder, transformers or diffusers.

GPU_MODELS = {
    "8b": ModelConfig(),  # DiMOO: d 4096, 32 layers, 32 heads, MLP 12288, vocab 134548
    "30m": CONFIGS["30m"][0],
    "tiny": CONFIGS["tiny"][0],
    "micro": tiny_config(n_layers=1, weight_tying=True),  # the GPU check's CPU smoke run
}
# fp8 rows: the backend named before "-fp8" over an fp8 copy of the suite's model (fp8_model).
FP8_BACKENDS = ("eager-fp8", "torch-graph-fp8")
GPU_BACKENDS = ("official", "eager", "torch-graph", *FP8_BACKENDS, "tensorrt", "onnxruntime")
# Exported graphs, run after the torch rows in this order: onnxruntime last, since its export
# converts the shared model to fp16 (CUDA) or fp32 (CPU) in place (TensorRT exports it as it is).
ENGINE_BACKENDS = ("tensorrt", "onnxruntime")
CPU_MODEL_LIMIT = 4 << 30  # bytes of weights the suite will build on a CPU (this machine: 24 GB RAM)


class Skip(Exception):
    """A backend that cannot run here; the message is recorded in the JSON."""


class SyntheticTokenizer:
    """Deterministic whitespace ids below the image range, so prompt rows have real-looking
    text and padding (key masks) without a tokenizer file. Latency does not depend on ids.
    Speaks the part of the Hugging Face tokenizer interface ``tokens.text_ids`` uses."""

    all_special_ids: tuple[int, ...] = ()
    unk_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> dict:
        words = text.replace("<", " <").replace(">", "> ").split()
        return {"input_ids": [1000 + (sum(map(ord, w)) * 7919) % 100000 for w in words]}


class OfficialStyleDenoiser:
    """The official generator's way of evaluating, behind the ``Denoiser`` call: the cond and
    uncond rows as two batch-1 forwards of their own lengths (no padding; the uncond template
    is shorter), full-vocabulary logits [1, L, V] cast to fp32 and then sliced to the image
    positions and the codebook columns, and a host read per step (the official loop indexes
    logits with the mask). The speed-up of every other row is measured against this one."""

    name = "official-style"
    ids_dtype = torch.long
    logits_dtype = torch.float32
    graph_safe = False

    def __init__(self, model, seq):
        self.model, self.seq = model, seq
        self.device = next(model.parameters()).device
        self.positions = seq.image_positions.to(self.device)  # [N] in the padded row
        lay = seq.layout
        self.cols = slice(lay.image_offset, lay.image_offset + lay.codebook)
        self.lengths: list[int] = []  # unpadded row lengths of the last call

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, key_mask: torch.Tensor, out: torch.Tensor) -> None:
        pads = (~key_mask).sum(-1).tolist()  # the host read per step
        self.lengths = [input_ids.shape[1] - p for p in pads]
        for r, p in enumerate(pads):  # cond rows, then uncond rows: one batch-1 forward each
            logits = self.model(input_ids[r:r + 1, p:]).float()  # [1, L_r, V]
            out[r].copy_(logits[0, self.positions - p, self.cols])


def official_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    """FLOPs of the official-style evaluation: one trunk per row at its own length, and the
    full-vocabulary head at every position."""
    return float(sum(cfg.flops_per_eval(L, 0, batch=1) + 2 * cfg.d_model * cfg.vocab_size * L for L in lengths))


def parse_resolution(r: str) -> tuple[int, int]:
    h, _, w = r.lower().partition("x")
    return int(h), int(w or h)


def sync_fn(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def event_times(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events around each call on CUDA (one synchronize at the
    end), perf_counter on the CPU."""
    sync = sync_fn(device)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        sync()
        return [a.elapsed_time(b) / 1e3 for a, b in ev]
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def matmul_peak_median(device: torch.device, n: int, dtype: torch.dtype, warmup: int = 3, reps: int = 10) -> float:
    """FLOP/s of an n^3 ``torch.mm`` on random data (never zeros), median of event timings."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    t = statistics.median(event_times(lambda: torch.mm(a, b, out=c), device, warmup, reps))
    return 2 * n**3 / t


def random_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``DimooModel(cfg)`` allocated directly on ``device`` in ``dtype`` (no fp32 copy, no
    checkpoint), weights drawn in place from a seeded normal at the scales of
    ``tiny.random_state_dict``: linear std 1/sqrt(fan_in), embedding std 1, norms 1 + 0.1 N(0, 1)."""
    from ladr_rt.model import DimooModel

    with torch.device("meta"):
        model = DimooModel(cfg).to(dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cpu" and nbytes > CPU_MODEL_LIMIT:
        raise SystemExit(f"refusing to build a {nbytes / 2**30:.1f} GiB model on the CPU; the full config is "
                         "for a GPU (use --gpu-model tiny with --device cpu)")
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.normal_(0.0, 0.1, generator=g).add_(1.0)
            elif name.endswith("wte.weight"):
                p.normal_(0.0, 1.0, generator=g)
            else:  # linear [out, in]
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
    return model.eval().requires_grad_(False)


def make_denoiser(backend: str, model, seq, device: torch.device, workdir: Path, ort_cuda: bool, log,
                  trt_full: bool = False):
    """The backend's ``Denoiser`` over ``model`` at ``seq``'s shape, or ``Skip(reason)``."""
    from ladr_rt.denoiser import EagerDenoiser

    if backend in FP8_BACKENDS:
        base = backend[: -len("-fp8")]
        fp8, extra = fp8_model(model, device, log)
        den, more = make_denoiser(base, fp8, seq, device, workdir, ort_cuda, log, trt_full)
        return den, {**more, **extra}
    if backend == "eager":
        return EagerDenoiser(model, seq.image_positions), {}
    if backend == "official":
        return OfficialStyleDenoiser(model, seq), {"note": OfficialStyleDenoiser.__doc__.split("\n\n")[0]}
    if backend == "tensorrt":
        return trt_denoiser(model, seq, device, workdir, trt_full, log)
    if backend == "torch-graph":
        if device.type != "cuda":
            raise Skip("needs a CUDA device (CUDA graphs)")
        from ladr_rt.engines.torch_graph import TorchGraphDenoiser

        return TorchGraphDenoiser(model, seq.image_positions), {}
    if backend == "onnxruntime":
        from ladr_rt.engines.manifest import EngineError
        from ladr_rt.engines.ort import OrtDenoiser, import_ort

        try:
            ort = import_ort()
        except EngineError as e:
            raise Skip(str(e)) from None
        have = ort.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise Skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(have)}); "
                           "install onnxruntime-gpu instead of onnxruntime (pip install 'ladr-rt[gpu]')")
            if not ort_cuda:
                raise Skip("onnxruntime has the CUDA EP, but the fixed-shape export of the full graph (~16 GB of "
                           "external data per resolution, written to disk, then loaded by onnxruntime) is not "
                           "run by default inside the one-call time budget; pass --ort-cuda (a run of its own)")
            dtype = torch.float16  # onnxruntime's CUDA EP lacks bf16 kernels for parts of this graph
        else:
            dtype = torch.float32  # the CPU EP has no bf16/fp16 kernels for most of it
        from ladr_rt.build import export_onnx
        from ladr_rt.engines.graph import EngineGraph

        model.to(dtype)  # in place: onnxruntime rows run after every torch row (run_gpu_suite)
        graph = EngineGraph.from_model(model, seq.seq_len, seq.image_positions)
        path = workdir / f"ort-{seq.spec.height}x{seq.spec.width}.onnx"
        t0 = time.perf_counter()
        export_onnx(graph, path, 2, seq.seq_len)
        export_s = time.perf_counter() - t0
        log(f"  onnxruntime: exported {path.name} in {export_s:.1f} s ({str(dtype).replace('torch.', '')})")
        del graph
        den = OrtDenoiser(path, canonical(device))  # compares tensor devices exactly: cuda:0 (the buffers) != cuda
        return den, {"export_s": export_s, "precision": str(dtype).replace("torch.", ""),
                     "providers": den.session.get_providers()}
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(GPU_BACKENDS)}")


_FP8_MODELS: "weakref.WeakKeyDictionary" = None  # model -> its fp8 copy, built once per suite


def fp8_model(model, device: torch.device, log):
    """``model`` with the trunk's linears in fp8 (``ladr_rt.fp8``), quantized from its weights once
    and cached: the embedding, norms and head are the model's own tensors (shared, not copied),
    so the fp8 rows add only the fp8 trunk to the memory the bf16 model holds. The row's peak
    memory therefore includes the bf16 trunk too; ``base_trunk_linear_bytes`` says how much of it
    a model loaded with ``--dtype fp8`` would not hold. ``Skip`` on a GPU without fp8 tensor cores."""
    global _FP8_MODELS
    import weakref

    from torch import nn

    from ladr_rt import fp8
    from ladr_rt.model import DimooModel

    try:
        fp8.check_fp8_device(device)
    except fp8.Fp8Unsupported as e:
        raise Skip(str(e)) from None
    if _FP8_MODELS is None:
        _FP8_MODELS = weakref.WeakKeyDictionary()
    if model not in _FP8_MODELS:
        t0 = time.perf_counter()
        with torch.device("meta"):
            copy = DimooModel(model.cfg)
        sd = {k: v for k, v in model.state_dict().items()}
        if next(model.parameters()).dtype != fp8.compute_dtype(device):  # the rest must stay shared, not cast
            raise Skip(f"the fp8 rows run beside a {fp8.compute_dtype(device)} model; the suite's is "
                       f"{next(model.parameters()).dtype}")
        copy = fp8.load_fp8(copy, sd, device)
        lin = [m for m in model.model.transformer.blocks.modules() if isinstance(m, nn.Linear)]
        modes = sorted({m.mode for m in copy.modules() if isinstance(m, fp8.Fp8Linear)})
        extra = {"precision": "fp8", "fp8_matmul": ",".join(modes), "quantize_s": round(time.perf_counter() - t0, 2),
                 "base_trunk_linear_bytes": sum(m.weight.numel() * m.weight.element_size() for m in lin),
                 "fp8_trunk_bytes": sum(m.weight.numel() + 4 * m.weight_scale.numel()
                                        for m in copy.modules() if isinstance(m, fp8.Fp8Linear))}
        log(f"  fp8: trunk quantized in {extra['quantize_s']} s ({extra['fp8_matmul']})")
        _FP8_MODELS[model] = (copy, extra)
    return _FP8_MODELS[model]


def fp8_vs_bf16(result: dict) -> dict:
    """Per (resolution, fp8 backend): the speed-up of the fp8 row over the same backend's row in
    the model's dtype (bf16 on CUDA), per evaluation and per whole step, and the peak memory:
    measured (with the shared bf16 trunk resident) and for an fp8 load (minus that trunk)."""
    rows = {(r["resolution"], r["backend"]): r for r in result.get("rows", [])}
    out: dict = {}
    for (res, backend), r in rows.items():
        if backend not in FP8_BACKENDS:
            continue
        b = rows.get((res, backend[: -len("-fp8")]))
        entry: dict = {"fp8_matmul": r.get("fp8_matmul")}
        if b is not None:
            entry["eval_speedup"] = b["eval_s"] / r["eval_s"]
            entry["whole_step_speedup"] = b["whole_step_s"] / r["whole_step_s"]
            entry["bf16_peak_memory_bytes"] = b.get("peak_memory_bytes")
        peak = r.get("peak_memory_bytes")
        entry["peak_memory_bytes_measured"] = peak
        entry["peak_memory_bytes_fp8_load"] = None if peak is None else peak - r.get("base_trunk_linear_bytes", 0)
        out[f"{res}/{backend}"] = entry
    return out


def trt_denoiser(model, seq, device: torch.device, workdir: Path, trt_full: bool, log):
    """The TensorRT row: the engine graph exported as ``ladr-rt build`` exports it, a plan built
    from it, and ``TrtDenoiser`` (the same Denoiser call as every row), or ``Skip(reason)``."""
    from ladr_rt.engines.manifest import EngineError

    if device.type != "cuda":
        raise Skip("needs a CUDA device (TensorRT builds for and runs on the GPU)")
    try:
        from ladr_rt.engines.trt import import_trt

        trt = import_trt()
    except (EngineError, ImportError) as e:
        raise Skip(f"TensorRT does not import here: {e}") from None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > 1 << 30 and not trt_full:
        raise Skip(f"TensorRT {trt.__version__} imports, but a plan of the full model ({weight_bytes / 2**30:.0f} GiB "
                   "of weights exported to ONNX, then a TensorRT build, per resolution) does not fit this suite's "
                   "time budget; pass --trt (a run of its own)")
    from ladr_rt.build import export_onnx
    from ladr_rt.engines.graph import EngineGraph
    from ladr_rt.engines.trt import TrtDenoiser, build_plan

    dtype = next(model.parameters()).dtype
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    graph = EngineGraph.from_model(model, seq.seq_len, seq.image_positions)
    onnx_path = workdir / f"trt-{seq.spec.height}x{seq.spec.width}.onnx"
    plan = onnx_path.with_suffix(".plan")
    t0 = time.perf_counter()
    export_onnx(graph, onnx_path, 2, seq.seq_len)
    export_s = time.perf_counter() - t0
    del graph
    t0 = time.perf_counter()
    build_plan(onnx_path, plan, precision)
    build_s = time.perf_counter() - t0
    log(f"  tensorrt: exported in {export_s:.1f} s, built {plan.name} ({precision}) in {build_s:.1f} s")
    return TrtDenoiser(plan, canonical(device)), {"export_s": export_s, "build_s": build_s, "precision": precision,
                                                  "tensorrt": trt.__version__}


def canonical(device: torch.device) -> torch.device:
    """cuda -> cuda:<current>: engine runners compare tensor devices exactly."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gpu_row(pipe, cfg: ModelConfig, device: torch.device, peak: float, warmup: int, reps: int, e2e_steps: int,
            ladr_evals: int, measure_e2e: bool) -> dict:
    """One (resolution, backend) row: evaluation, sampler step, whole step, memory, roofline and
    end to end. ``pipe`` is a ``LadrPipeline`` over the backend's denoiser."""
    from ladr_rt.samplers import make_sampler
    from ladr_rt.tokens import build_rows

    den, seq = pipe.denoiser, pipe.seq
    L, N = seq.seq_len, seq.n_image
    ids, mask = build_rows(pipe.tokenizer, [PROMPT], seq)
    pipe.ids.copy_(ids)
    pipe.key_mask.copy_(mask)
    row: dict = {"seq_len": L, "n_image": N, "rows": 2, "ids_dtype": str(den.ids_dtype).replace("torch.", ""),
                 "logits_dtype": str(den.logits_dtype).replace("torch.", "")}

    # 1. evaluation: batch-2 CFG (cond + uncond rows), image-code logits only
    ev = event_times(lambda: den(pipe.ids, pipe.key_mask, pipe.logits), device, warmup, reps)
    row["eval_s"] = statistics.median(ev)
    row["eval_s_min"], row["eval_s_max"] = min(ev), max(ev)
    lg = pipe.logits.float()
    row["logits_std"] = float(lg.std())
    row["logits_finite"] = bool(torch.isfinite(lg).all())
    del lg

    # 2. sampler step (ladr) on this backend's logits, along a run's first steps (state evolves)
    scfg = SamplerConfig(name="ladr", steps=e2e_steps, temperature=1.0, seed=0)
    state = pipe._state(e2e_steps)
    n_steps = max(1, min(reps, e2e_steps - 2))
    state.reset(0)
    sampler = make_sampler(scfg, state)
    row["sampler_step_s"] = statistics.median(event_times(lambda: sampler.step(pipe.logits), device, 1, n_steps))

    # 3. whole step (write tokens + evaluation + sampler step) as generate runs it: one
    #    CUDA-graph replay for graph_safe denoisers on CUDA (pipeline.step_runner), else plain
    state.reset(0)
    sampler = make_sampler(scfg, state)
    runner = pipe.step_runner(sampler)
    row["whole_step_graph"] = type(getattr(runner, "__self__", None)).__name__ == "CUDAGraph"
    row["capture_s"] = pipe.capture_seconds  # warm-up step + capture, once per (sampler config, T) and pipeline
    row["whole_step_s"] = statistics.median(event_times(runner, device, 1, n_steps))
    del runner

    # 4. roofline (the official-style evaluation does more work: full-vocabulary head, two lengths)
    if isinstance(den, OfficialStyleDenoiser):
        flops = official_flops(cfg, den.lengths)
        row["official_lengths"] = den.lengths
    else:
        flops = cfg.flops_per_eval(L, N, batch=2)
    row.update(flops_per_eval=flops, achieved_flops=flops / row["eval_s"], roofline_s=flops / peak,
               roofline_fraction=flops / peak / row["eval_s"])

    # 5. end to end: modelled (count x whole step) and, when asked, measured runs
    per_step = row["whole_step_s"]
    row["end_to_end_model_s"] = {f"baseline_{e2e_steps}": e2e_steps * per_step, f"ladr_{ladr_evals}": ladr_evals * per_step,
                                 "per_step_s": per_step, "note": "evaluations x whole-step time"}
    if measure_e2e:
        meas = {}
        # the official generator has only the baseline rule: its row is the reference run
        for name in ("baseline",) if isinstance(den, OfficialStyleDenoiser) else ("baseline", "ladr"):
            _, trace, evals, secs = pipe.generate_codes(PROMPT, SamplerConfig(name=name, steps=e2e_steps,
                                                                               temperature=1.0, seed=0))
            meas[name] = {"seconds": secs, "evaluations": evals, "steps": e2e_steps,
                          "capture_seconds": trace.get("capture_seconds", 0.0)}
        meas["note"] = ("generate_codes with random weights: the evaluation count LADR reaches is the random "
                        "model's, not DiMOO's; end_to_end_model_s gives the cost at a stated count")
        row["end_to_end_measured"] = meas
    else:
        row["end_to_end_measured"] = "not measured (time budget or --no-e2e)"
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        row["peak_memory_bytes"] = None  # torch.cuda.max_memory_allocated: CUDA only
    return row


def run_gpu_suite(model_name: str = "8b", resolutions=((512, 512), (1024, 1024)), backends=GPU_BACKENDS,
                  device: str = "cuda", dtype: torch.dtype = torch.bfloat16, prompt_budget: int = 64,
                  warmup: int = 3, reps: int = 10, e2e_steps: int = 64, ladr_evals: int = 15,
                  e2e_resolutions=None, peak_n: int | None = None, ort_cuda: bool = False,
                  budget_s: float = 420.0, out: Path | None = None, log=lambda s: print(s, file=sys.stderr),
                  deadline_s: float | None = None, trt_full: bool = False) -> dict:
    """Rows for every (resolution, backend). The torch rows run resolution by resolution (a run
    cut short still has a complete comparison at the first resolution); the exported-engine
    rows (onnxruntime, tensorrt) run last, since the onnxruntime export converts the shared
    model's dtype in place. Each row is written to ``out`` as it lands. ``budget_s``: no measured
    end-to-end run starts after it; ``deadline_s``: no row starts after it (the JSON says which)."""
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.tokens import SequenceLayout

    t_start = time.perf_counter()
    dev = torch.device(device)
    cfg = GPU_MODELS[model_name]
    peak_n = peak_n or (8192 if dev.type == "cuda" else 256)
    peak = matmul_peak_median(dev, peak_n, torch.bfloat16)
    log(f"[gpu-suite] {hardware(dev)}: bf16 {peak_n}^3 torch.mm peak {peak / 1e12:.1f} TFLOP/s")
    t0 = time.perf_counter()
    model = random_model(cfg, dev, dtype, seed=0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    w = next(model.model.transformer.blocks[0].parameters())
    log(f"[gpu-suite] {model_name}: {n_params / 1e9:.2f}B params, {weight_bytes / 2**30:.1f} GiB "
        f"{str(dtype).replace('torch.', '')} on {dev} in {time.perf_counter() - t0:.1f} s (weight std {float(w.float().std()):.4f})")
    e2e_res = set(map(tuple, e2e_resolutions)) if e2e_resolutions is not None else {tuple(r) for r in resolutions}
    result: dict = {
        "bench": "latency-gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(dev),
        "device": str(dev), "torch": torch.__version__, "model": model_name, "config": dataclasses.asdict(cfg),
        "params": n_params, "weight_bytes": weight_bytes, "dtype": str(dtype).replace("torch.", ""),
        "weights": "random, seeded normal (linear std 1/sqrt(fan_in), embedding std 1, norms 1 + 0.1 N(0,1))",
        "weights_std_block0": float(w.float().std()), "prompt_budget": prompt_budget, "warmup": warmup, "reps": reps,
        "matmul_peak_flops": peak,
        "matmul_peak_note": f"bf16 {peak_n}^3 torch.mm on random data, median of {10} timings (events on CUDA)",
        "timing": "CUDA events around each call after warm-up, median" if dev.type == "cuda" else "perf_counter, median",
        "rows": [], "skipped": [],
    }

    def save():
        result["total_s"] = time.perf_counter() - t_start
        result["speedup_vs_official"] = speedups_vs_official(result)
        result["fp8_vs_bf16"] = fp8_vs_bf16(result)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            os.replace(tmp, out)

    save()
    torch_rows = [(b, r) for r in resolutions for b in backends if b not in ENGINE_BACKENDS]
    engine_rows = [(b, r) for b in ENGINE_BACKENDS if b in backends for r in resolutions]
    with tempfile.TemporaryDirectory(prefix="ladr-bench-gpu-") as tmp:
        for backend, (h, w_) in torch_rows + engine_rows:
            spec = ImageSpec(h, w_, prompt_budget)
            seq = SequenceLayout(spec, cfg.layout)
            where = {"resolution": f"{h}x{w_}", "backend": backend}
            if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
                reason = f"not started: past the suite's deadline of {deadline_s:.0f} s"
                result["skipped"].append({**where, "reason": reason})
                log(f"  {h}x{w_} {backend}: not started (past the {deadline_s:.0f} s deadline)")
                save()
                continue
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            try:
                den, extra = make_denoiser(backend, model, seq, dev, Path(tmp), ort_cuda, log, trt_full)
            except Skip as e:
                result["skipped"].append({**where, "reason": str(e)})
                log(f"  {h}x{w_} {backend}: skipped ({e})")
                save()
                continue
            except Exception as e:  # an export or engine build that broke: record it, go on
                import traceback

                result["skipped"].append({**where, "reason": f"failed to build: {type(e).__name__}: {str(e)[:300]}",
                                          "traceback": traceback.format_exc()[-2000:]})
                log(f"  {h}x{w_} {backend}: BUILD FAILED {type(e).__name__}: {str(e)[:200]}")
                save()
                continue
            pipe = LadrPipeline(den, SyntheticTokenizer(), None, cfg.layout, spec, batch=1)
            measure = (h, w_) in e2e_res and time.perf_counter() - t_start < budget_s
            try:
                r = gpu_row(pipe, cfg, dev, peak, warmup, reps, e2e_steps, ladr_evals, measure)
            except Exception as e:  # record and go on: one call should bring back every row it can
                import traceback

                result["skipped"].append({**where, "reason": f"failed: {type(e).__name__}: {str(e)[:300]}",
                                          "traceback": traceback.format_exc()[-2000:]})
                log(f"  {h}x{w_} {backend}: FAILED {type(e).__name__}: {str(e)[:200]}")
                save()
                continue
            finally:
                del pipe, den
            if (h, w_) in e2e_res and not measure:
                r["end_to_end_measured"] = f"not measured: past the suite's time budget of {budget_s:.0f} s"
            r.update(where, params=n_params, weight_bytes=weight_bytes, **extra)
            result["rows"].append(r)
            e2e = r["end_to_end_measured"]
            runs = ", ".join(f"{k} {v['seconds']:.2f} s / {v['evaluations']}" for k, v in e2e.items()
                             if isinstance(v, dict)) if isinstance(e2e, dict) else ""
            log(f"  {h}x{w_} {backend:12s} L={r['seq_len']:5d} N={r['n_image']:5d}  eval {r['eval_s'] * 1e3:9.2f} ms  "
                f"step {r['sampler_step_s'] * 1e3:7.2f} ms  whole step {r['whole_step_s'] * 1e3:9.2f} ms"
                f"{' (graph)' if r['whole_step_graph'] else ''}  {r['achieved_flops'] / 1e12:7.1f} TFLOP/s "
                f"({100 * r['roofline_fraction']:.0f}% of peak)  peak mem "
                + (f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "n/a")
                + (f"  e2e {runs}" if runs else ""))
            save()
    del model
    save()
    return result


def speedups_vs_official(result: dict) -> dict:
    """Per (resolution, backend): the official-style 64-step baseline's seconds over this row's,
    measured (baseline and LADR runs of this row) and modelled (LADR at the stated count x this
    row's whole step, against the official's T x its plain step). Rows without an official row
    at their resolution get none."""
    ref = {r["resolution"]: r for r in result["rows"] if r["backend"] == "official"}
    out: dict = {}
    for r in result["rows"]:
        o = ref.get(r["resolution"])
        if o is None:
            continue
        sp: dict = {}
        om, rm = o["end_to_end_model_s"], r["end_to_end_model_s"]
        base_key = next(k for k in om if k.startswith("baseline_"))
        for k, v in rm.items():
            if k.startswith(("baseline_", "ladr_")):
                sp[f"{k}_modelled"] = om[base_key] / v
        oe, re_ = o["end_to_end_measured"], r["end_to_end_measured"]
        if isinstance(oe, dict) and isinstance(re_, dict) and "baseline" in oe:
            for k, v in re_.items():
                if isinstance(v, dict) and v["seconds"] > 0:
                    sp[f"{k}_{v['evaluations']}evals_measured"] = oe["baseline"]["seconds"] / v["seconds"]
        out[f"{r['resolution']}/{r['backend']}"] = sp
    return out


def gpu_summary(result: dict, out: Path | None) -> dict:
    """The compact last-line JSON of a GPU run (the full rows are in the file)."""
    rows = []
    speed = speedups_vs_official(result)
    for r in result["rows"]:
        e2e = r["end_to_end_measured"]
        rows.append({
            "res": r["resolution"], "backend": r["backend"], "eval_ms": round(r["eval_s"] * 1e3, 3),
            "sampler_step_ms": round(r["sampler_step_s"] * 1e3, 3), "whole_step_ms": round(r["whole_step_s"] * 1e3, 3),
            "whole_step_graph": r["whole_step_graph"], "tflops": round(r["achieved_flops"] / 1e12, 2),
            "frac_of_peak": round(r["roofline_fraction"], 3),
            "peak_mem_gib": None if r["peak_memory_bytes"] is None else round(r["peak_memory_bytes"] / 2**30, 2),
            "e2e_model_s": {k: round(v, 3) for k, v in r["end_to_end_model_s"].items() if isinstance(v, float)},
            "e2e_measured_s": ({k: [round(v["seconds"], 3), v["evaluations"]] for k, v in e2e.items() if isinstance(v, dict)}
                               if isinstance(e2e, dict) else None),
            "speedup_vs_official": {k: round(v, 2)
                                    for k, v in speed.get(f"{r['resolution']}/{r['backend']}", {}).items()},
        })
    return {"bench": "latency-gpu", "out": str(out) if out else None, "hardware": result["hardware"],
            "model": result["model"], "peak_tflops": round(result["matmul_peak_flops"] / 1e12, 1), "rows": rows,
            "skipped": [{k: v for k, v in s.items() if k != "traceback"} for s in result["skipped"]],
            "fp8_vs_bf16": {k: {n: (round(v, 3) if isinstance(v, float) else v) for n, v in e.items()}
                            for k, e in fp8_vs_bf16(result).items()},
            "total_s": round(result["total_s"], 1)}


def gpu_main(a) -> dict:
    res = [parse_resolution(r) for r in a.resolutions.split(",")]
    e2e = [parse_resolution(r) for r in a.e2e_resolutions.split(",")] if a.e2e_resolutions else res
    if a.no_e2e:
        e2e = []
    out = Path(a.gpu_out)
    result = run_gpu_suite(a.gpu_model, res, tuple(a.gpu_backends.split(",")), a.device, torch.bfloat16,
                           a.prompt_budget, a.warmup, a.reps, a.e2e_steps, a.ladr_evals, e2e, ort_cuda=a.ort_cuda,
                           budget_s=a.budget_s, out=out, deadline_s=a.deadline_s, trt_full=a.trt)
    return gpu_summary(result, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="tiny,30m", help="comma-separated: " + ",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (CPU)")
    ap.add_argument("--steps", type=int, default=16, help="T for the end-to-end run")
    ap.add_argument("--reps", type=int, default=20, help="timed repeats per evaluation measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="3 repeats, 4 steps: a smoke run")
    ap.add_argument("--out", default="bench/results/latency_cpu.json", help="JSON results file")
    g = ap.add_argument_group("GPU suite (full config, random weights; runs after the CPU suite when CUDA is present)")
    g.add_argument("--gpu", action="store_true", help="run only the GPU suite (no CPU rows)")
    g.add_argument("--device", default="cuda", help="device of the GPU suite (cpu: a smoke run at tiny size)")
    g.add_argument("--gpu-model", default="8b", choices=sorted(GPU_MODELS), help="model config of the GPU suite")
    g.add_argument("--resolutions", default="512,1024", help="comma-separated, N (N x N) or HxW")
    g.add_argument("--prompt-budget", type=int, default=64)
    g.add_argument("--gpu-backends", default=",".join(GPU_BACKENDS), help="comma-separated: " + ",".join(GPU_BACKENDS))
    g.add_argument("--e2e-steps", type=int, default=64, help="T of the measured baseline / ladr runs")
    g.add_argument("--ladr-evals", type=int, default=15, help="evaluation count of the modelled LADR run")
    g.add_argument("--e2e-resolutions", default="", help="resolutions with measured end-to-end runs (default: all)")
    g.add_argument("--no-e2e", action="store_true", help="no measured end-to-end runs (modelled only)")
    g.add_argument("--ort-cuda", action="store_true",
                   help="export the full graph for onnxruntime's CUDA EP (16 GB per resolution; a run of its own)")
    g.add_argument("--budget-s", type=float, default=420.0,
                   help="after this many seconds the suite stops starting measured end-to-end runs")
    g.add_argument("--deadline-s", type=float, default=None,
                   help="after this many seconds the suite starts no further row (the JSON lists what it skipped)")
    g.add_argument("--trt", action="store_true",
                   help="build the TensorRT row at full size too (export + plan build per resolution; "
                        "a run of its own)")
    g.add_argument("--gpu-out", default="bench/results/latency_gpu.json", help="JSON results file of the GPU suite")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.steps, a.warmup = 3, 4, 1
    if a.gpu:
        if torch.device(a.device).type == "cpu":
            torch.set_num_threads(a.threads)
        if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
            print("--gpu: no CUDA device on this machine (for a CPU smoke run of the same code: --gpu --device cpu "
                  "--gpu-model tiny --resolutions 64x96 --prompt-budget 32)", file=sys.stderr)
            return 2
        print(json.dumps(gpu_main(a)))
        return 0
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
    gpu = "not run: no CUDA device on this machine"
    if torch.cuda.is_available():
        a.device = "cuda"
        gpu = gpu_main(a)
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
