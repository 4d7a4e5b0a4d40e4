"""prompt -> tokens -> (denoiser -> sampler step) x <= T -> VQ decode -> images.

    pipe = LadrPipeline.from_pretrained("path/to/Lumina-DiMOO", height=512, width=512)
    out = pipe("a red circle above a blue square", SamplerConfig(name="ladr", seed=0))
    out.images[0].save("out.png")
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import ImageSpec, ModelConfig, RunOptions, SamplerConfig, TokenLayout
from .denoiser import Denoiser
from .graphs import CUDA_GRAPHS, CudaGraphs, StepGraphs
from . import threads
from .samplers import RunState, make_sampler
from .tokens import SequenceLayout, build_rows, check_prompt, unknown_words, vocabulary, write_image_tokens
from .vq import to_uint8


class GenerationStopped(Exception):
    """The caller's ``stop`` event was set: the run ended at a step boundary, nothing returned."""


class NonFiniteLogits(ValueError):
    """The denoiser produced NaN/inf: broken weights or config, or a corrupt engine."""


NONFINITE_HINT = ("the checkpoint's weights or config.json (rope_theta, rms_norm_eps) are broken, or the engine file is "
                  "corrupt: re-download the checkpoint or rebuild the engine with `ladr-rt build`")


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt
    codes: np.ndarray  # [B, H, W] int64 final code grid
    trace: dict  # per-step masked / rescued counts and t_eff, one list per prompt
    evaluations: int  # denoiser calls
    seconds: float  # prompt to codes (excludes VQ decode)
    decode_seconds: float
    warnings: list = dataclasses.field(default_factory=list)  # one line per prompt with unknown words (prompt_warning)


def plain(v):
    """A numpy scalar as the Python number it holds (seeds from np.random, guidance from numpy
    arithmetic); anything else as it is, for the validation that follows to judge."""
    return v.item() if isinstance(v, np.generic) and not isinstance(v, np.bool_) else v


def plain_config(cfg) -> SamplerConfig:
    """``cfg`` with numpy scalars in its number fields made plain; TypeError for a non-config."""
    if not isinstance(cfg, SamplerConfig):
        raise TypeError(f"cfg must be a ladr_rt.SamplerConfig, got {type(cfg).__name__}; leave it out for the "
                        "defaults")
    changes = {k: plain(getattr(cfg, k)) for k in ("steps", "cfg", "temperature", "seed")
               if isinstance(getattr(cfg, k), np.generic)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


_FLOPS: dict = {}


def device_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Matmul FLOP/s on ``device`` in ``dtype``, best of three (measured once per process; ~ms)."""
    key = (str(device), dtype)
    if key not in _FLOPS:
        n = 4096 if device.type == "cuda" else 1024  # large enough to reach the device's matmul rate
        a = torch.randn(n, n, device=device).to(dtype)
        best = float("inf")
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ a
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _FLOPS[key] = 2 * n ** 3 / max(best, 1e-9)
    return _FLOPS[key]


def _path_arg(v, name: str, required: bool = False):
    if v is None and not required:
        return None
    if isinstance(v, (str, os.PathLike)) and not isinstance(v, bytes):
        return v  # an empty or wrong path is read_config's / read_manifest's to name
    raise TypeError(f"{name} must be a directory path (str or os.PathLike), got {type(v).__name__} {v!r:.40}")


def _int_arg(v, name: str):
    """numpy integers accepted as ints; None passes (the caller's default); other types refused."""
    v = plain(v)
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r:.40}")


def _batch_arg(batch) -> int:
    batch = _int_arg(batch, "batch")
    if batch is None or batch < 1:
        raise ValueError(f"batch must be a positive integer (prompts per call), got {batch!r}")
    return batch


class LadrPipeline:
    graphs: CudaGraphs = CUDA_GRAPHS  # the torch.cuda seam of step_runner

    def __init__(self, denoiser: Denoiser, tokenizer, vq, layout: TokenLayout, spec: ImageSpec, batch: int = 1,
                 default_cfg: float = ModelConfig.default_cfg, vocab_size: int | None = None,
                 cpu_threads: int | None = None):
        spec.validate(layout.vq_scale)
        cpu_threads = plain(cpu_threads)  # a numpy integer is an int here, as for every other count
        threads.choose(None, cpu_threads)  # a bad count is refused here, not at the first call
        self.cpu_threads = cpu_threads  # None: chosen from the work (ladr_rt/threads.py)
        self.vocab_size = vocab_size  # the model's; prompt ids past it are refused before an evaluation
        self.default_cfg = default_cfg  # the model's guidance scale for SamplerConfig(cfg=None)
        self.denoiser, self.tokenizer, self.vq, self.layout = denoiser, tokenizer, vq, layout
        self.seq = SequenceLayout(spec, layout)
        self.batch = batch
        dev = denoiser.device
        mc = getattr(getattr(denoiser, "model", None), "cfg", None)  # eager: the model's sizes
        self._matmul_flops = (threads.largest_matmul_flops(mc.d_model, mc.mlp_hidden_size, 2 * batch, self.seq.seq_len)
                              if dev.type == "cpu" and isinstance(mc, ModelConfig) else None)
        B, L, N = batch, self.seq.seq_len, self.seq.n_image
        self.positions = self.seq.image_positions.to(dev)  # [N]
        self.ids = torch.empty(2 * B, L, dtype=denoiser.ids_dtype, device=dev)  # [2B, L] engine input
        self.key_mask = torch.empty(2 * B, L, dtype=torch.bool, device=dev)  # [2B, L] True = real token
        self.logits = torch.empty(2 * B, N, layout.codebook, dtype=denoiser.logits_dtype, device=dev)  # [2B, N, K]
        self.tok_scratch = torch.empty(B, N, dtype=denoiser.ids_dtype, device=dev)  # [B, N]
        self.state: RunState | None = None
        self.owner = None  # the serve.Scheduler that holds the slots, if any (then calls are refused)
        # One call at a time: the buffers above and the run-state are shared by every call, so
        # two threads stepping at once would interleave and corrupt each other's images.
        self._lock = threading.Lock()
        self._graphs = StepGraphs()  # whole-step CUDA graphs, reused across calls (step_runner)
        self.capture_seconds = 0.0  # what the last step_runner call spent capturing

    @classmethod
    def from_pretrained(cls, model_dir=None, height: int | None = None, width: int | None = None,
                        prompt_budget: int | None = None, dtype: torch.dtype | str | None = None, device: str = "cpu",
                        batch: int = 1, cpu_threads: int | None = None,
                        options: RunOptions = RunOptions()) -> "LadrPipeline":
        """The pipeline over the model itself. ``model_dir`` None: the testbed model shipped in the
        package; ``height``/``width`` None: the model's default size (config.json
        ``ladr_default_size``); ``prompt_budget`` None: ``ImageSpec``'s default; ``dtype`` None: the
        CLI's ``--dtype auto`` (bf16 on CUDA, fp32 on the CPU; ``checkpoint.resolve_dtype``), or a
        torch dtype or its name ("fp32", "bf16", "fp16", "fp8": e4m3 trunk linears, ``ladr_rt.fp8``);
        ``cpu_threads`` None: torch's intra-op threads chosen from the model's size on the CPU
        (``ladr_rt/threads.py``). ``options``: the denoiser (eager, or torch-graph with
        ``cuda_graph``) and its attention kernel."""
        from .checkpoint import DTYPES, CheckpointError, load_model, load_tokenizer, read_config, resolve_dtype
        from .denoiser import EagerDenoiser
        from .vq import load_vq

        model_dir = _path_arg(model_dir, "model_dir")
        height, width, prompt_budget = (_int_arg(v, k) for k, v in (("height", height), ("width", width),
                                                                      ("prompt_budget", prompt_budget)))
        batch = _batch_arg(batch)
        cpu_threads = plain(cpu_threads)
        threads.choose(None, cpu_threads)  # a bad count: refused before anything loads
        dtype = resolve_dtype(dtype, device)
        if dtype == DTYPES["fp8"]:  # before the weights load: a GPU without fp8 is refused up front
            from .fp8 import check_fp8_device

            check_fp8_device(device)
        graphed = options.graphed(torch.device(device).type)  # a forced choice the device lacks: refused before loading
        if model_dir is None:
            from . import shipped

            model_dir = shipped.model_dir()
            if not (model_dir / "config.json").is_file():
                raise CheckpointError(f"the shipped model {model_dir} is missing from this install; pass a model "
                                      "directory (--model DIR)")
        cfg = read_config(model_dir)
        # Only an absent value takes the default: 0 is a (bad) value and is refused below.
        spec = ImageSpec(cfg.default_size[0] if height is None else height,
                         cfg.default_size[1] if width is None else width,
                         ImageSpec.prompt_budget if prompt_budget is None else prompt_budget)
        spec.validate(cfg.layout.vq_scale)
        # Everything cheap and checkable before the (possibly 16 GB) weights load.
        tokenizer = load_tokenizer(model_dir)
        vq = load_vq(model_dir, device, cfg.layout)
        model = load_model(model_dir, dtype=dtype, device=device)
        seq = SequenceLayout(spec, cfg.layout)
        if graphed:
            from .engines.torch_graph import TorchGraphDenoiser

            den = TorchGraphDenoiser(model, seq.image_positions, options.attention)
        else:
            den = EagerDenoiser(model, seq.image_positions, options.attention)
        pipe = cls(den, tokenizer, vq, cfg.layout, spec, batch, cfg.default_cfg, cfg.vocab_size, cpu_threads)
        pipe.model_config = cfg
        return pipe

    @classmethod
    def from_engine(cls, engine, device: str = "auto", height: int | None = None, width: int | None = None,
                    prompt_budget: int | None = None, batch: int | None = None,
                    model_dir=None) -> "LadrPipeline":
        """A pipeline whose denoiser is the engine built by ``ladr-rt build --out engine``.

        Shape arguments left as None take the engine's values; any other value must match
        it (a fixed-shape engine cannot serve another shape). Tokenizer and VQ decoder come
        from the model directory recorded in the manifest (or ``model_dir``), whose config
        and weights must still be the ones the engine was built from.
        """
        from .checkpoint import checkpoint_digest, load_tokenizer, read_config
        from .engines import check_manifest, load_denoiser, read_manifest
        from .vq import load_vq

        engine, model_dir = _path_arg(engine, "engine", required=True), _path_arg(model_dir, "model_dir")
        height, width, prompt_budget, batch = map(plain, (height, width, prompt_budget, batch))
        for flag, v in (("--height", height), ("--width", width), ("--prompt-budget", prompt_budget),
                        ("--batch", batch)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{flag} must be a positive integer, got {v!r}")
        m = read_manifest(engine)
        model_dir = model_dir or m["model"]["dir"]
        cfg = read_config(model_dir)
        check_manifest(m, config_digest=cfg.digest(), weights_digest=checkpoint_digest(model_dir), height=height,
                       width=width, prompt_budget=prompt_budget, batch=batch, model=model_dir)
        a = m["build_args"]
        spec = ImageSpec(a["height"], a["width"], a["prompt_budget"])
        tokenizer = load_tokenizer(model_dir)
        denoiser = load_denoiser(m, device)
        pipe = cls(denoiser, tokenizer, load_vq(model_dir, denoiser.device, cfg.layout), cfg.layout, spec,
                   a["batch"], cfg.default_cfg, cfg.vocab_size)
        pipe.model_config = cfg
        return pipe

    model_config: ModelConfig | None = None  # set by from_pretrained/from_engine: sizes for estimate_seconds

    def sampling_flops(self, cfg: SamplerConfig) -> float | None:
        """FLOPs of ``cfg.steps`` evaluations at this size (``ModelConfig.flops_per_eval``, cond and
        uncond rows); None without a model config."""
        if self.model_config is None:
            return None
        return self.model_config.flops_per_eval(self.seq.seq_len, self.seq.n_image, 2 * self.batch) * cfg.steps

    def estimate_seconds(self, cfg: SamplerConfig) -> float | None:
        """A lower bound on sampling time: ``sampling_flops`` over a large matmul's throughput
        measured on this device (~0.3 s on a CPU; small models and attention reach less). For
        saying, before a run that would take hours, that it will."""
        flops = self.sampling_flops(cfg)
        return None if flops is None else flops / device_flops(self.denoiser.device, self.logits.dtype)

    def _state(self, T: int) -> RunState:
        h, w = self.seq.grid
        if self.state is None or self.state.T != T:
            self.state = RunState(self.batch, h, w, self.layout.codebook, T, self.layout.mask, self.denoiser.device)
        return self.state

    def step(self, sampler) -> None:
        """One evaluation + one sampler step for every slot, all on the device."""
        s = sampler.s
        write_image_tokens(self.ids, self.positions, s.z, s.M, self.layout, self.tok_scratch)
        self.denoiser(self.ids, self.key_mask, self.logits)
        sampler.step(self.logits)

    def step_runner(self, sampler):
        """``self.step(sampler)``, replayed from one CUDA graph when the denoiser says its call
        can be captured (``graph_safe``: static buffers, no host sync) and runs on CUDA.

        Graphs are cached on the pipeline (``StepGraphs``): a later call with the same sampler
        config, T and batch replays the graph it already has. The caller resets the run-state in
        place and reseeds its generator before the first replay; CUDAGraph.replay reads the
        registered generator's seed and offset at every replay (``replay_prologue``), so another
        seed needs no new capture. ``self.capture_seconds`` is what this call spent capturing
        (0.0 on a cache hit or without a graph).

        A capture runs one real warm-up step; the run-state, ids and generator are restored after
        it, so the first replayed step is the run's first step. The denoiser's own evaluation
        graph is switched off meanwhile: the step graph holds the evaluation's kernels, and a
        warm-up that captured the evaluation too would cost a second capture and pool for nothing.
        A capture that fails, whatever it raises, falls back to plain steps with a warning (never
        silently), once per cache key."""
        self.capture_seconds = 0.0
        den, s = self.denoiser, sampler.s
        if not (getattr(den, "graph_safe", False) and self.graphs.usable(den.device)):
            return lambda: self.step(sampler)
        self._graphs.bind(s, *s.gens, den)
        key = StepGraphs.key(sampler)
        if key not in self._graphs.entries:
            t0 = time.perf_counter()
            graph = self._capture_step(sampler)
            self.capture_seconds = time.perf_counter() - t0
            self._graphs.bind(s, *s.gens, den)  # a failed capture replaced the generators: older graphs are stale
            self._graphs.put(key, graph)
        graph = self._graphs.entries[key]
        return graph.replay if graph is not None else (lambda: self.step(sampler))

    def _capture_step(self, sampler):
        """The step's graph, or None (warned) when capture fails; state restored either way."""
        import warnings

        s, dev = sampler.s, self.denoiser.device
        snapshot = {k: v.clone() for k, v in s.tensors().items()}
        ids, gen_states = self.ids.clone(), [g.get_state() for g in s.gens]
        own_graph = getattr(self.denoiser, "cuda_graph", None)  # switched off here, restored in `finally`
        if own_graph is not None:
            self.denoiser.cuda_graph = False
        graph = None
        try:
            # The generator is registered whether or not this config draws from it (a graph that
            # draws nothing advances it by 0): no sampler can then replay frozen noise.
            graph = self.graphs.capture(lambda: self.step(sampler), dev, tuple(s.gens))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            warnings.warn(f"CUDA-graph capture of the step failed ({type(e).__name__}: {first}); running steps "
                          "without it", RuntimeWarning, stacklevel=3)
            # The generator took part in a capture that did not finish, and some torch versions
            # leave it flagged as capturing (every later draw would raise): continue on a fresh
            # generator holding the saved state.
            s.gens[:] = [torch.Generator(device=g.device) for g in s.gens]
            # The denoiser's own evaluation graph (torch-graph) was captured before this failure
            # and the plain steps that follow would replay it: dropped, so the denoiser captures
            # afresh (or runs eagerly, warned, if that capture fails as well).
            drop = getattr(self.denoiser, "drop_graph", None)
            if drop is not None:
                drop()
        finally:
            if own_graph is not None:
                self.denoiser.cuda_graph = own_graph
            for k, v in snapshot.items():
                getattr(s, k).copy_(v)
            self.ids.copy_(ids)
            for g, st in zip(s.gens, gen_states):
                g.set_state(st)
            self.graphs.synchronize(dev)
        return graph

    # ------------------------------------------------------------------ slots (serve/scheduler.py)

    def prompt_rows(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's cond and uncond rows, checked: ids [2, L], key_mask [2, L] (host work,
        done before a slot is taken)."""
        check_prompt(prompt)  # None would build the unconditional rows: an image nobody asked for
        return self._rows([prompt])

    def _rows(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Cond and uncond rows of ``prompts`` (None: the unconditional prompt), ids [2n, L] and
        key_mask [2n, L], with their ids checked against the model's vocabulary once per call,
        not per step."""
        ids, key_mask = build_rows(self.tokenizer, prompts, self.seq)
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"the tokenizer gave id {int(ids.max())}, past the model's vocabulary of {self.vocab_size} "
                             "(config.json): the tokenizer files belong to another model")
        return ids, key_mask

    def open_slots(self, cfg: SamplerConfig):
        """A run-state of ``batch`` idle slots and the sampler that steps them (``cfg`` fixes
        the sampler kind, temperature and T's upper bound for the batch). Idle rows hold the
        unconditional prompt so that their (discarded) evaluation stays finite."""
        state = self._state(cfg.steps)
        state.reset(cfg.seed)
        ids, key_mask = self._rows([None])
        self.ids.copy_(ids[1:].expand_as(self.ids))
        self.key_mask.copy_(key_mask[1:].expand_as(self.key_mask))
        for b in range(self.batch):
            state.retire(b)
        return make_sampler(cfg, state, self.default_cfg)

    def admit(self, state: RunState, slot: int, rows: tuple[torch.Tensor, torch.Tensor], seed: int,
              steps: int | None = None, guidance: float | None = None) -> None:
        """Between steps: slot ``slot`` takes a request (its ``prompt_rows``) — its cond and
        uncond rows of ids/key_mask written, its run-state row reset and seeded. Nothing else moves."""
        ids, key_mask = rows
        B = self.batch
        for r, row in ((slot, 0), (B + slot, 1)):
            self.ids[r].copy_(ids[row])
            self.key_mask[r].copy_(key_mask[row])
        state.admit(slot, seed, steps, guidance)

    # Past this many words the vocabulary is named by its command, not listed in the warning.
    LIST_VOCAB_UP_TO = 80

    def prompt_warning(self, prompt: str) -> str | None:
        """One line naming the prompt's words the model does not know (they are dropped: the
        image ignores them) and its vocabulary, or None. Cheap (one tokenizer call): the CLI
        prints it, __call__ returns it in ``warnings``, a server can put it in its response."""
        words = unknown_words(self.tokenizer, prompt)
        if not words:
            return None
        vocab = vocabulary(self.tokenizer)
        shown = ", ".join(repr(w) for w in words[:8]) + (f" and {len(words) - 8} more" if len(words) > 8 else "")
        known = (f"it knows these {len(vocab)}: {' '.join(vocab)}" if len(vocab) <= self.LIST_VOCAB_UP_TO
                 else "`ladr-rt vocab --model DIR` lists the words it knows")
        return f"the model does not know {shown}, so the image ignores {'it' if len(words) == 1 else 'them'}; {known}"

    def decode(self, codes: torch.Tensor) -> list:
        """codes [n, H, W] -> PIL images."""
        from PIL import Image

        return [Image.fromarray(a) for a in to_uint8(self.vq.decode(codes))]

    def generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False, on_step=None,
                       stop: threading.Event | None = None):
        """``on_step(sampler)``, if given, runs on the host after every step (the run-state then
        holds that step's z, M, M_prev, P, delta, frontier and rescued): for diagnostics, not
        for serving, since whatever it reads back costs a sync per step. ``stop``, if given, is
        read between steps: once set, the run raises GenerationStopped after the step in flight
        (a thread running the pipeline is stopped this way; the main thread's Ctrl-C stops it too)."""
        dev = self.denoiser.device
        # Current-device CUDA calls (streams, graph capture, synchronize) must mean the
        # denoiser's device, also for cuda:N with N > 0.
        with self._lock, self.thread_scope(), (torch.cuda.device(dev) if dev.type == "cuda"
                                               else contextlib.nullcontext()):
            return self._generate_codes(prompts, cfg, progress, on_step, stop)

    def thread_scope(self):
        """The intra-op thread count for this pipeline's steps, set for the block in the calling
        thread (the scheduler's loop runs its steps under it too)."""
        return threads.scope(threads.choose(self._matmul_flops, self.cpu_threads))

    def _generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False, on_step=None,
                        stop: threading.Event | None = None):
        if self.owner is not None:
            raise RuntimeError("this pipeline's slots belong to a serve.Scheduler: submit the prompt to it, or close "
                               "the scheduler first")
        if not isinstance(prompts, (str, list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            check_prompt(p)
        cfg = plain_config(cfg)
        if len(prompts) != self.batch:
            raise ValueError(f"this pipeline runs batches of {self.batch} prompt(s), got {len(prompts)}")
        ids, key_mask = self._rows(prompts)
        self.ids.copy_(ids)
        self.key_mask.copy_(key_mask)
        state = self._state(cfg.steps)
        state.reset(cfg.seed)
        sampler = make_sampler(cfg, state, self.default_cfg)
        step = self.step_runner(sampler)
        capture_seconds = self.capture_seconds  # before the timer: a first call's warm-up step and capture
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, desc=cfg.name, unit="step", leave=False)
        dev = self.denoiser.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        evals = 0
        try:
            while evals < cfg.steps and state.keep_going():  # the one host read per step
                if stop is not None and stop.is_set():  # a host flag: no device sync
                    raise GenerationStopped(f"stopped after {evals} of at most {cfg.steps} steps")
                step()
                evals += 1
                if on_step is not None:
                    on_step(sampler)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                # LADR ends before T: the bar closes at the steps that ran (12/12), not at 12/64
                # with an ETA for steps that will never come.
                bar.total = evals
                bar.refresh()
                bar.close()
        sync()
        seconds = time.perf_counter() - t0
        if state.saw_nonfinite():
            raise NonFiniteLogits(
                f"the {self.denoiser.name} denoiser returned NaN/inf logits within the first {evals} evaluation(s), "
                f"so no image was written; {NONFINITE_HINT}")
        h, w = self.seq.grid
        trace = state.read_trace(evals)
        trace["cfg"] = sampler.cfg.cfg  # the guidance scale used (the model's when SamplerConfig.cfg is None)
        # the phase table that ran (ladr-delayed's delayed flag set), as `--ladr` takes it back; None: not LADR
        trace["ladr"] = sampler.cfg.phase_table()
        trace["capture_seconds"] = capture_seconds  # 0.0 when the step graph was cached or not used
        return state.z.view(self.batch, h, w).clone(), trace, evals, seconds

    def __call__(self, prompts: str | list[str], cfg: SamplerConfig = SamplerConfig(),
                 progress: bool = False, stop: threading.Event | None = None) -> GenerationResult:
        from PIL import Image

        codes, trace, evals, seconds = self.generate_codes(prompts, cfg, progress, stop=stop)  # holds the lock
        t0 = time.perf_counter()
        rgb = to_uint8(self.vq.decode(codes))
        decode_seconds = time.perf_counter() - t0
        trace["evaluations"] = evals
        trace["seconds"] = seconds
        warnings = [w for p in ([prompts] if isinstance(prompts, str) else prompts) if (w := self.prompt_warning(p))]
        return GenerationResult([Image.fromarray(a) for a in rgb], codes.cpu().numpy(), trace, evals, seconds,
                                decode_seconds, warnings)
