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


def ort_matmul_peak(n: int = 1024, reps: int = 20, threads: int | None = None) -> float | None:
    """onnxruntime's fp32 MatMul FLOP/s on the CPU EP at ``threads``, best of ``reps``: its
    GEMM (MLAS) beats torch's on some CPUs, so a roofline against torch.mm alone put
    onnxruntime rows above 100%. None when onnx/onnxruntime are missing."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper

        from ladr_rt.engines.ort import open_session
    except ImportError:
        return None
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    with tempfile.TemporaryDirectory(prefix="ladr-mm-") as d:
        path = Path(d) / "mm.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        sess = open_session(path, ["CPUExecutionProvider"], threads)
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(3):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


PEAK_SIZES = ((256, 200), (512, 60), (1024, 20))  # (n, repeats): short GEMMs too, as short as the tiny rows' ops


def cpu_gemm_peak(threads: int) -> tuple[float, dict]:
    """The roofline's peak on the CPU: the best fp32 GEMM measured now, on the same threads,
    across the libraries whose rows are in the table (torch.mm: eager and the inductor
    package's extern mm; onnxruntime MatMul) and across n^3 sizes 256-1024, each the best of
    its repeats. Short GEMMs count because on a shared machine a 1024^3 GEMM (tens of ms) is
    always interrupted while a sub-millisecond evaluation often is not: against long GEMMs
    alone the tiny rows read above 100%. Returns (peak, per-library FLOP/s)."""
    peaks: dict[str, float] = {}
    for n, reps in PEAK_SIZES:
        peaks["torch.mm"] = max(peaks.get("torch.mm", 0.0), matmul_peak(torch.device("cpu"), n, reps))
        o = ort_matmul_peak(n, reps, threads=threads)
        if o is not None:
            peaks["onnxruntime MatMul"] = max(peaks.get("onnxruntime MatMul", 0.0), o)
    return max(peaks.values()), peaks


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


def inductor_cpu(ckpt: Path, out: Path, spec: ImageSpec):
    """The inductor-cpu row's pipeline: ``ladr-rt build --backend inductor`` (timed; the
    package's OpenMP regions take torch's thread count now, i.e. --threads) and from_engine."""
    from ladr_rt.build import BuildOptions, build
    from ladr_rt.pipeline import LadrPipeline

    t0 = time.perf_counter()
    build(BuildOptions(model=str(ckpt), out=str(out), height=spec.height, width=spec.width,
                       prompt_budget=spec.prompt_budget, precision="fp32", backend="inductor"),
          log=lambda s: print(s, file=sys.stderr), device="cpu")
    build_s = time.perf_counter() - t0
    pipe = LadrPipeline.from_engine(out, device="cpu")
    m = json.loads(out.with_suffix(".json").read_text())
    return pipe, {"build_s": build_s, "compile_s": m["target"]["compile_seconds"],
                  "package_bytes": out.with_suffix(".pt2").stat().st_size,
                  "build_note": "ladr-rt build --backend inductor: export + AOTInductor compile + validation"}


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
GPU_BACKENDS = ("official", "eager", "torch-graph", *FP8_BACKENDS, "inductor", "tensorrt", "onnxruntime")
# Exported graphs, run after the torch rows in this order: onnxruntime last, since its export
# converts the shared model to fp16 (CUDA) or fp32 (CPU) in place (TensorRT exports it as it is).
ENGINE_BACKENDS = ("tensorrt", "inductor", "onnxruntime")
INDUCTOR_FULL_LIMIT = 1 << 30  # bytes of weights above which the inductor row is measured per block and scaled
CPU_MODEL_LIMIT = 4 << 30  # bytes of weights the suite will build on a CPU (this machine: 24 GB RAM)


class Skip(Exception):
    """A backend that cannot run here; the message is recorded in the JSON."""


class Scaled(Skip):
    """A backend measured on one transformer block (eager and compiled, same run) instead of the
    full model; ``data`` goes into the JSON's ``scaled_rows``, never into ``rows``."""

    def __init__(self, msg: str, data: dict):
        super().__init__(msg)
        self.data = data


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
    if backend == "inductor":
        return inductor_denoiser(model, seq, device, workdir, log)
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


def inductor_denoiser(model, seq, device: torch.device, workdir: Path, log, full: bool | None = None):
    """The inductor row: the engine graph compiled as ``ladr-rt build --backend inductor``
    compiles it (AOTInductor .pt2) and run by ``InductorDenoiser``. Above
    INDUCTOR_FULL_LIMIT of weights (the 8B model: a 16 GB package per resolution, and a
    compile of 32 blocks) it raises ``Scaled`` with a per-block measurement instead."""
    from ladr_rt.engines.inductor import InductorDenoiser, check_toolchain, compile_package
    from ladr_rt.engines.manifest import EngineError

    try:
        check_toolchain(device)
    except EngineError as e:
        raise Skip(str(e)) from None
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if full is None:
        full = weight_bytes <= INDUCTOR_FULL_LIMIT
    if not full:
        data = inductor_block(model, seq, device, workdir, log)
        raise Scaled(f"measured per block ({data['block_speedup']:.2f}x eager on one block), scaled", data)
    from ladr_rt.engines.graph import EngineGraph

    dtype = next(model.parameters()).dtype
    graph = EngineGraph.from_model(model, seq.seq_len, seq.image_positions)
    path = workdir / f"inductor-{seq.spec.height}x{seq.spec.width}.pt2"
    t0 = time.perf_counter()
    compile_package(graph, path, 2, seq.seq_len, {"bench": "latency"})
    build_s = time.perf_counter() - t0
    del graph
    log(f"  inductor: compiled {path.name} ({str(dtype).replace('torch.', '')}) in {build_s:.1f} s, "
        f"{path.stat().st_size / 2**20:.1f} MiB")
    N, K = seq.n_image, seq.layout.codebook
    den = InductorDenoiser(path, canonical(device), {"input_ids": [2, seq.seq_len], "key_mask": [2, seq.seq_len],
                                                     "logits": [2, N, K]})
    return den, {"build_s": build_s, "package_bytes": path.stat().st_size,
                 "precision": str(dtype).replace("torch.", ""), "graph_safe": den.graph_safe}


def inductor_block(model, seq, device: torch.device, workdir: Path, log, warmup: int = 3, reps: int = 10) -> dict:
    """One transformer block at the row's shape [2, L, d], eager and AOTInductor-compiled, timed
    in the same run (regional compilation: the 32 blocks are identical, so one block's gain is
    each block's). The full-model estimate is made from the eager row of the same resolution:
    eval(eager) - n_layers x (block(eager) - block(inductor)); head and embedding stay eager's."""
    from torch import nn

    from ladr_rt.engines.inductor import load_package
    from ladr_rt.model import key_bias

    block = model.model.transformer.blocks[0]
    cfg, L = model.cfg, seq.seq_len
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(2, L, cfg.d_model, device=device, dtype=dtype, generator=g)
    mask = torch.ones(2, L, dtype=torch.bool, device=device)
    mask[1, : seq.spec.prompt_budget // 2] = False  # the uncond row's left padding
    bias = key_bias(mask, dtype)
    cos, sin = model.rope(L, device)

    class OneBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

        def forward(self, x, bias):
            return self.block(x, self.cos, self.sin, bias)

    mod = OneBlock().eval()
    with torch.inference_mode():
        eager_s = statistics.median(event_times(lambda: mod(x, bias), device, warmup, reps))
    path = workdir / f"inductor-block-{seq.spec.height}x{seq.spec.width}.pt2"
    t0 = time.perf_counter()
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notices from inside export
        ep = torch.export.export(mod, (x, bias), strict=False)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    build_s = time.perf_counter() - t0
    runner = load_package(path, canonical(device)).loader.run
    with torch.inference_mode():
        ind_s = statistics.median(event_times(lambda: runner([x, bias]), device, warmup, reps))
        err = float((runner([x, bias])[0].float() - mod(x, bias).float()).abs().max())
    log(f"  inductor (one block): eager {eager_s * 1e3:.2f} ms, compiled {ind_s * 1e3:.2f} ms "
        f"(compile {build_s:.1f} s, max abs diff {err:.3g})")
    return {"method": "per-block measurement, scaled (not a full-model run)", "block_eager_s": eager_s,
            "block_inductor_s": ind_s, "block_speedup": eager_s / ind_s, "block_build_s": build_s,
            "block_package_bytes": path.stat().st_size, "block_max_abs_diff": err, "n_layers": cfg.n_layers,
            "seq_len": L, "precision": str(dtype).replace("torch.", ""),
            "estimate": "eval_s(eager row) - n_layers x (block_eager_s - block_inductor_s)"}


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
    from ladr_rt.attention import describe

    row["attention"] = describe(den, cfg.head_dim, L, cfg.n_heads)  # the kernel this row's evaluation runs

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

    # 5. end to end. Measured: the baseline rule at T steps (T evaluations on every row: the
    #    same work). LADR's count depends on the weights: a random model stops after ~11-12
    #    evaluations, DiMOO after its own count, so a random-weight LADR run is timed only as a
    #    functional run, and LADR's cost is a model at a stated count, never "measured".
    per_step = row["whole_step_s"]
    row["end_to_end_cost_model_s"] = {
        f"baseline_{e2e_steps}": e2e_steps * per_step, f"ladr_{ladr_evals}": ladr_evals * per_step,
        "per_step_s": per_step, "ladr_evals_assumed": ladr_evals,
        "assumption": (f"LADR reaches {ladr_evals} evaluations per image on DiMOO (assumed, --ladr-evals; not "
                       "measured: the weights are random); cost = evaluations x this row's measured whole step")}
    if measure_e2e:
        _, trace, evals, secs = pipe.generate_codes(PROMPT, SamplerConfig(name="baseline", steps=e2e_steps,
                                                                          temperature=1.0, seed=0))
        row["end_to_end_measured"] = {
            "baseline": {"seconds": secs, "evaluations": evals, "steps": e2e_steps,
                         "capture_seconds": trace.get("capture_seconds", 0.0)},
            "note": f"generate_codes, baseline rule, {e2e_steps} steps: the same evaluations on every row"}
        # the official generator has only the baseline rule
        if not isinstance(den, OfficialStyleDenoiser):
            _, trace, evals, secs = pipe.generate_codes(PROMPT, SamplerConfig(name="ladr", steps=e2e_steps,
                                                                              temperature=1.0, seed=0))
            row["ladr_run_random_weights"] = {
                "seconds": secs, "evaluations": evals, "steps": e2e_steps,
                "capture_seconds": trace.get("capture_seconds", 0.0),
                "note": ("a functional LADR run (capture, stop test) on random weights: its evaluation count is the "
                         "random model's, not DiMOO's, so its time is no speed-up of any kind")}
    else:
        row["end_to_end_measured"] = "not measured (time budget or --no-e2e)"
    row.update(memory_fields(device, f"{seq.spec.height}x{seq.spec.width}"))
    # Further per-row fields (the attention kernel, compile or precision settings) are added to
    # `row` here by the code that knows them; gpu_summary copies any key listed in ROW_EXTRA_KEYS.
    return row


# Cards a user might run a row's settings on, and the margin added to a measured peak.
CARDS_GB = (24, 48, 80)
CONTEXT_MARGIN_BYTES = 1 << 30  # CUDA context, cuBLAS/cuDNN workspaces: not counted by the caching allocator
FRAGMENTATION_MARGIN = 0.10  # the allocator's reserved-but-unused blocks, as a share of the peak
FITS_ASSUMPTION = (f"fits if max_memory_allocated x {1 + FRAGMENTATION_MARGIN:.2f} + "
                   f"{CONTEXT_MARGIN_BYTES / 2**30:.0f} GiB (CUDA context, library workspaces) <= the card's "
                   "nominal size in GiB (a '24 GB' card: 24 GiB); an estimate from this run's peak, not a run on "
                   "that card")


def memory_fields(device: torch.device, resolution: str) -> dict:
    """Peak memory of this row (the suite resets the peak before each row, so it is this row's:
    the shared weights, its denoiser's buffers and graphs, its runs) and whether an image at
    ``resolution`` with this row's settings fits 24 / 48 / 80 GB cards."""
    if device.type != "cuda":
        why = "not measured: torch.cuda.max_memory_allocated is CUDA only"
        return {"peak_memory_bytes": None, "peak_reserved_bytes": None, "fits_cards": why,
                "fits_resolution": resolution}
    peak = torch.cuda.max_memory_allocated(device)
    need = peak * (1 + FRAGMENTATION_MARGIN) + CONTEXT_MARGIN_BYTES
    return {"peak_memory_bytes": peak, "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "fits_cards": {f"{gb}GB": need <= gb * 2**30 for gb in CARDS_GB}, "fits_need_bytes": int(need),
            "fits_resolution": resolution, "fits_assumption": FITS_ASSUMPTION}


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
            start_bytes = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)  # the row's peak is its own
                start_bytes = torch.cuda.memory_allocated(dev)  # the weights; more means an earlier row leaked
            try:
                den, extra = make_denoiser(backend, model, seq, dev, Path(tmp), ort_cuda, log, trt_full)
            except Scaled as e:
                eager = next((r for r in result["rows"] if r["backend"] == "eager" and r["resolution"] == f"{h}x{w_}"),
                             None)
                est = None if eager is None else eager["eval_s"] - e.data["n_layers"] * (
                    e.data["block_eager_s"] - e.data["block_inductor_s"])
                result.setdefault("scaled_rows", []).append(
                    {**where, **e.data, "eager_eval_s": None if eager is None else eager["eval_s"],
                     "eval_s_estimate": est})
                log(f"  {h}x{w_} {backend}: {e}" + (f"; estimated eval {est * 1e3:.2f} ms vs eager "
                                                    f"{eager['eval_s'] * 1e3:.2f} ms" if est is not None else ""))
                save()
                continue
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
            r.update(where, params=n_params, weight_bytes=weight_bytes, memory_at_row_start_bytes=start_bytes, **extra)
            result["rows"].append(r)
            e2e = r["end_to_end_measured"]
            runs = (f"baseline {e2e['baseline']['seconds']:.2f} s / {e2e['baseline']['evaluations']}"
                    if isinstance(e2e, dict) else "")
            if "ladr_run_random_weights" in r:
                lr = r["ladr_run_random_weights"]
                runs += f", ladr (random weights) {lr['seconds']:.2f} s / {lr['evaluations']}"
            log(f"  {h}x{w_} {backend:12s} L={r['seq_len']:5d} N={r['n_image']:5d}  eval {r['eval_s'] * 1e3:9.2f} ms  "
                f"step {r['sampler_step_s'] * 1e3:7.2f} ms  whole step {r['whole_step_s'] * 1e3:9.2f} ms"
                f"{' (graph)' if r['whole_step_graph'] else ''}  {r['achieved_flops'] / 1e12:7.1f} TFLOP/s "
                f"({100 * r['roofline_fraction']:.0f}% of peak)  peak mem "
                + (f"{r['peak_memory_bytes'] / 2**30:.1f} GiB, fits "
                   + ",".join(k for k, v in r["fits_cards"].items() if v) if r["peak_memory_bytes"] else "n/a")
                + (f"  e2e {runs}" if runs else ""))
            save()
    del model
    save()
    return result


def speedups_vs_official(result: dict) -> dict:
    """Per (resolution, backend), against the official-style row at its resolution (rows
    without one get none):

    * ``measured``: the same work timed on both rows: one evaluation, one whole step, and one
      image at equal steps (the baseline rule, T evaluations each) when both ran end to end.
    * ``cost_model``: LADR at an assumed evaluation count x this row's measured whole step,
      against the official image's measured seconds (its modelled T x whole step when it did
      not run end to end), with the assumption stated. Never called measured: random weights
      cannot tell how many evaluations LADR takes on DiMOO."""
    ref = {r["resolution"]: r for r in result["rows"] if r["backend"] == "official"}
    out: dict = {}
    for r in result["rows"]:
        o = ref.get(r["resolution"])
        if o is None:
            continue
        measured = {"per_evaluation": o["eval_s"] / r["eval_s"], "per_whole_step": o["whole_step_s"] / r["whole_step_s"]}
        oe, re_ = o["end_to_end_measured"], r["end_to_end_measured"]
        base_key = next(k for k in o["end_to_end_cost_model_s"] if k.startswith("baseline_"))
        official_image_s, official_image = o["end_to_end_cost_model_s"][base_key], "modelled"
        if isinstance(oe, dict) and "baseline" in oe:
            official_image_s, official_image = oe["baseline"]["seconds"], "measured"
            if isinstance(re_, dict) and "baseline" in re_ and re_["baseline"]["seconds"] > 0:
                measured[f"image_{oe['baseline']['steps']}_steps"] = oe["baseline"]["seconds"] / re_["baseline"]["seconds"]
        sp = out[f"{r['resolution']}/{r['backend']}"] = {"measured": measured}
        if r is not o:  # the official generator has only the baseline rule
            cm = r["end_to_end_cost_model_s"]
            n = cm["ladr_evals_assumed"]
            sp["cost_model"] = {f"ladr_{n}_evals": official_image_s / cm[f"ladr_{n}"],
                                "assumption": f"{cm['assumption']}; against the official-style image "
                                              f"({base_key.split('_')[1]} steps, {official_image})"}
    return out


# Row keys gpu_summary copies as they are (fields other code adds to a row: list them here).
ROW_EXTRA_KEYS = ("attention",)


def gpu_summary(result: dict, out: Path | None) -> dict:
    """The compact last-line JSON of a GPU run (the full rows are in the file)."""
    rows = []
    speed = speedups_vs_official(result)
    for r in result["rows"]:
        e2e = r["end_to_end_measured"]
        lr = r.get("ladr_run_random_weights")
        rows.append({
            "res": r["resolution"], "backend": r["backend"], "eval_ms": round(r["eval_s"] * 1e3, 3),
            "sampler_step_ms": round(r["sampler_step_s"] * 1e3, 3), "whole_step_ms": round(r["whole_step_s"] * 1e3, 3),
            "whole_step_graph": r["whole_step_graph"], "tflops": round(r["achieved_flops"] / 1e12, 2),
            "frac_of_peak": round(r["roofline_fraction"], 3),
            "peak_mem_gib": None if r["peak_memory_bytes"] is None else round(r["peak_memory_bytes"] / 2**30, 2),
            "fits_cards": r["fits_cards"],
            "image_baseline_measured_s": ([round(e2e["baseline"]["seconds"], 3), e2e["baseline"]["evaluations"]]
                                          if isinstance(e2e, dict) else None),
            "ladr_run_random_weights_s": None if lr is None else [round(lr["seconds"], 3), lr["evaluations"]],
            "cost_model_s": {k: round(v, 3) for k, v in r["end_to_end_cost_model_s"].items() if isinstance(v, float)},
            "speedup_vs_official": _rounded(speed.get(f"{r['resolution']}/{r['backend']}", {})),
            **{k: r[k] for k in ROW_EXTRA_KEYS if k in r},
        })
    return {"bench": "latency-gpu", "out": str(out) if out else None, "hardware": result["hardware"],
            "model": result["model"], "peak_tflops": round(result["matmul_peak_flops"] / 1e12, 1), "rows": rows,
            "skipped": [{k: v for k, v in s.items() if k != "traceback"} for s in result["skipped"]],
            "fp8_vs_bf16": {k: {n: (round(v, 3) if isinstance(v, float) else v) for n, v in e.items()}
                            for k, e in fp8_vs_bf16(result).items()},
            "total_s": round(result["total_s"], 1)}


def _rounded(d):
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    return round(d, 2) if isinstance(d, float) else d


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
    g.add_argument("--e2e-steps", type=int, default=64,
                   help="T of the measured baseline run (and of the functional random-weight LADR run)")
    g.add_argument("--ladr-evals", type=int, default=15,
                   help="LADR's evaluations per image assumed by the cost model (random weights cannot measure it)")
    g.add_argument("--e2e-resolutions", default="", help="resolutions with measured end-to-end runs (default: all)")
    g.add_argument("--no-e2e", action="store_true", help="no end-to-end runs (cost model only)")
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
    ap.add_argument("--no-inductor", action="store_true",
                    help="no inductor-cpu row (it compiles an AOTInductor package per config: ~15-60 s each)")
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

    peak, peaks = cpu_gemm_peak(a.threads)
    peak_samples = [peaks]
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
            engines = [("eager", eager, {}), ("onnxruntime-cpu", ort, {})]
            if not a.no_inductor:
                engines.append(("inductor-cpu", *inductor_cpu(ckpt, Path(tmp) / f"{name}-ind", spec)))
            L, N = eager.seq.seq_len, eager.seq.n_image
            flops = cfg.flops_per_eval(L, N, batch=2)
            n_params = sum(p.numel() for p in eager.denoiser.model.parameters())
            for backend, pipe, extra in engines:
                # The peak is re-measured before every row and the best kept: on a shared machine
                # a GEMM timed in a busy second is slow, and a roofline against it exceeds 100%.
                peak_samples.append(cpu_gemm_peak(a.threads)[1])
                peak = max(peak, *peak_samples[-1].values())
                r = bench_pipeline(pipe, a.steps, a.warmup, a.reps)
                r.update(extra)
                r.update(config=name, backend=backend, device="cpu", seq_len=L, n_image=N, rows=2,
                         params=n_params, flops_per_eval=flops, roofline_s=flops / peak,
                         roofline_fraction=flops / peak / r["eval_s"])
                rows.append(r)
                print(f"{name:5s} {backend:16s} L={L:4d} N={N:4d}  eval {r['eval_s'] * 1e3:8.2f} ms  step "
                      f"{r['sampler_step_s'] * 1e3:7.2f} ms  image {r['end_to_end_s']:6.3f} s / "
                      f"{r['evaluations_per_image']} evals  roofline {r['roofline_s'] * 1e3:7.2f} ms "
                      f"({100 * r['roofline_fraction']:.0f}% of peak)", file=sys.stderr)
    peaks = {k: max(p[k] for p in peak_samples if k in p) for k in peak_samples[0]}
    peak = max(peaks.values())
    for r in rows:  # against the run's best GEMM, known only now
        r.update(roofline_s=r["flops_per_eval"] / peak, roofline_fraction=r["flops_per_eval"] / peak / r["eval_s"])
    over = [f"{r['config']}/{r['backend']}" for r in rows if r["roofline_fraction"] > 1.0]
    if over:
        print(f"WARNING: {', '.join(over)} above 100% of the best GEMM measured: the machine was busier while the "
              "GEMMs were timed than during those rows", file=sys.stderr)
    ratios = {}
    for name in a.configs.split(","):
        e = next(r for r in rows if r["config"] == name and r["backend"] == "eager")
        o = next(r for r in rows if r["config"] == name and r["backend"] == "onnxruntime-cpu")
        ratios[name] = {"eval_eager_over_ort": e["eval_s"] / o["eval_s"],
                        "end_to_end_eager_over_ort": e["end_to_end_s"] / o["end_to_end_s"]}
        i = next((r for r in rows if r["config"] == name and r["backend"] == "inductor-cpu"), None)
        if i is not None:
            ratios[name]["eval_eager_over_inductor"] = e["eval_s"] / i["eval_s"]
    gpu = "not run: no CUDA device on this machine"
    if torch.cuda.is_available():
        a.device = "cuda"
        gpu = gpu_main(a)
    result = {
        "bench": "latency", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(dev),
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]), "threads": a.threads,
        "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
        "matmul_peak_flops": peak, "matmul_peaks": peaks, "matmul_peak_samples": len(peak_samples),
        "matmul_peak_note": ("best fp32 GEMM measured in this run on the same threads across the libraries in the "
                             "table (torch.mm, onnxruntime MatMul) and n^3 sizes 256 (best of 200), 512 (60), "
                             "1024 (20), timed before every row; roofline_fraction is against it"),
        "load_before": os.getloadavg(),
        "rows": rows, "eager_over_ort": ratios, "gpu": gpu, "total_s": time.perf_counter() - t_start,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    print(f"roofline: FLOPs/eval over the best fp32 GEMM measured in this run, {peak / 1e9:.1f} GFLOP/s ("
          + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()) + f"; {hardware(dev)})", file=sys.stderr)
    print(json.dumps({"bench": "latency", "out": str(out), "eager_over_ort": ratios, "gpu": gpu,
                      "total_s": round(result["total_s"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
