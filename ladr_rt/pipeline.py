"""prompt -> tokens -> (denoiser -> sampler step) x <= T -> VQ decode -> images.

    pipe = LadrPipeline.from_pretrained("path/to/Lumina-DiMOO", height=512, width=512)
    out = pipe("a red circle above a blue square", SamplerConfig(name="ladr", seed=0))
    out.images[0].save("out.png")
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import ImageSpec, ModelConfig, SamplerConfig, TokenLayout
from .denoiser import Denoiser
from .graphs import CUDA_GRAPHS, CudaGraphs, StepGraphs
from .samplers import RunState, make_sampler
from .tokens import SequenceLayout, build_rows, write_image_tokens
from .vq import to_uint8


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


class LadrPipeline:
    graphs: CudaGraphs = CUDA_GRAPHS  # the torch.cuda seam of step_runner

    def __init__(self, denoiser: Denoiser, tokenizer, vq, layout: TokenLayout, spec: ImageSpec, batch: int = 1,
                 default_cfg: float = ModelConfig.default_cfg, vocab_size: int | None = None):
        spec.validate(layout.vq_scale)
        self.vocab_size = vocab_size  # the model's; prompt ids past it are refused before an evaluation
        self.default_cfg = default_cfg  # the model's guidance scale for SamplerConfig(cfg=None)
        self.denoiser, self.tokenizer, self.vq, self.layout = denoiser, tokenizer, vq, layout
        self.seq = SequenceLayout(spec, layout)
        self.batch = batch
        dev = denoiser.device
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
                        prompt_budget: int | None = None, dtype: torch.dtype | str = torch.float32,
                        device: str = "cpu", batch: int = 1) -> "LadrPipeline":
        """The eager pipeline. ``model_dir`` None: the testbed model shipped in the package;
        ``height``/``width`` None: the model's default size (config.json ``ladr_default_size``);
        ``prompt_budget`` None: ``ImageSpec``'s default. ``dtype``: a torch dtype or its name
        ("fp32", "bf16", "fp16", "fp8": e4m3 trunk linears, see ``ladr_rt.fp8``)."""
        from .checkpoint import DTYPES, CheckpointError, load_model, load_tokenizer, read_config
        from .denoiser import EagerDenoiser
        from .vq import load_vq

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            dtype = DTYPES[dtype]
        if dtype == DTYPES["fp8"]:  # before the weights load: a GPU without fp8 is refused up front
            from .fp8 import check_fp8_device

            check_fp8_device(device)

        if model_dir is None:
            from .testbed import model_dir as shipped

            model_dir = shipped()
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
        return cls(EagerDenoiser(model, seq.image_positions), tokenizer, vq, cfg.layout, spec, batch, cfg.default_cfg,
                   cfg.vocab_size)

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
        return cls(denoiser, tokenizer, load_vq(model_dir, denoiser.device, cfg.layout), cfg.layout, spec,
                   a["batch"], cfg.default_cfg, cfg.vocab_size)

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
        ids, key_mask = build_rows(self.tokenizer, [prompt], self.seq)
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
        ids, key_mask = self.prompt_rows(None)
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

    def decode(self, codes: torch.Tensor) -> list:
        """codes [n, H, W] -> PIL images."""
        from PIL import Image

        return [Image.fromarray(a) for a in to_uint8(self.vq.decode(codes))]

    def generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False, on_step=None):
        """``on_step(sampler)``, if given, runs on the host after every step (the run-state then
        holds that step's z, M, M_prev, P, delta, frontier and rescued): for diagnostics, not
        for serving, since whatever it reads back costs a sync per step."""
        dev = self.denoiser.device
        # Current-device CUDA calls (streams, graph capture, synchronize) must mean the
        # denoiser's device, also for cuda:N with N > 0.
        with self._lock, (torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()):
            return self._generate_codes(prompts, cfg, progress, on_step)

    def _generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False, on_step=None):
        if self.owner is not None:
            raise RuntimeError("this pipeline's slots belong to a serve.Scheduler: submit the prompt to it, or close "
                               "the scheduler first")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != self.batch:
            raise ValueError(f"this pipeline runs batches of {self.batch} prompt(s), got {len(prompts)}")
        ids, key_mask = build_rows(self.tokenizer, prompts, self.seq)
        if self.vocab_size is not None and int(ids.max()) >= self.vocab_size:  # once per call, not per step
            raise ValueError(f"the tokenizer gave id {int(ids.max())}, past the model's vocabulary of {self.vocab_size} "
                             "(config.json): the tokenizer files belong to another model")
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
        while evals < cfg.steps and state.keep_going():  # the one host read per step
            step()
            evals += 1
            if on_step is not None:
                on_step(sampler)
            if bar is not None:
                bar.update(1)
        sync()
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
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
                 progress: bool = False) -> GenerationResult:
        from PIL import Image

        codes, trace, evals, seconds = self.generate_codes(prompts, cfg, progress)  # holds the lock
        t0 = time.perf_counter()
        rgb = to_uint8(self.vq.decode(codes))
        decode_seconds = time.perf_counter() - t0
        trace["evaluations"] = evals
        trace["seconds"] = seconds
        return GenerationResult([Image.fromarray(a) for a in rgb], codes.cpu().numpy(), trace, evals, seconds,
                                decode_seconds)
