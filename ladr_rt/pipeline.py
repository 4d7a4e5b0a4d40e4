"""prompt -> tokens -> (denoiser -> sampler step) x <= T -> VQ decode -> images.

    pipe = LadrPipeline.from_pretrained("path/to/Lumina-DiMOO", height=512, width=512)
    out = pipe("a red circle above a blue square", SamplerConfig(name="ladr", seed=0))
    out.images[0].save("out.png")
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from .config import ImageSpec, ModelConfig, SamplerConfig, TokenLayout
from .denoiser import Denoiser
from .samplers import RunState, make_sampler
from .tokens import SequenceLayout, build_rows, write_image_tokens
from .vq import to_uint8


@dataclass
class GenerationResult:
    images: list  # PIL images, one per prompt
    codes: np.ndarray  # [B, H, W] int64 final code grid
    trace: dict  # per-step masked / rescued counts and t_eff, one list per prompt
    evaluations: int  # denoiser calls
    seconds: float  # prompt to codes (excludes VQ decode)
    decode_seconds: float


class LadrPipeline:
    def __init__(self, denoiser: Denoiser, tokenizer, vq, layout: TokenLayout, spec: ImageSpec, batch: int = 1,
                 default_cfg: float = ModelConfig.default_cfg):
        spec.validate(layout.vq_scale)
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

    @classmethod
    def from_pretrained(cls, model_dir=None, height: int | None = None, width: int | None = None,
                        prompt_budget: int | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        batch: int = 1) -> "LadrPipeline":
        """The eager pipeline. ``model_dir`` None: the testbed model shipped in the package;
        ``height``/``width`` None: the model's default size (config.json ``ladr_default_size``);
        ``prompt_budget`` None: ``ImageSpec``'s default."""
        from .checkpoint import CheckpointError, load_model, load_tokenizer, read_config
        from .denoiser import EagerDenoiser
        from .vq import load_vq

        if model_dir is None:
            from .testbed import model_dir as shipped

            model_dir = shipped()
            if not (model_dir / "config.json").is_file():
                raise CheckpointError(f"the shipped model {model_dir} is missing from this install; pass a model "
                                      "directory (--model DIR)")
        cfg = read_config(model_dir)
        spec = ImageSpec(height or cfg.default_size[0], width or cfg.default_size[1],
                         prompt_budget or ImageSpec.prompt_budget)
        spec.validate(cfg.layout.vq_scale)  # before the (possibly 16 GB) load
        model = load_model(model_dir, dtype=dtype, device=device)
        layout = model.cfg.layout
        seq = SequenceLayout(spec, layout)
        return cls(EagerDenoiser(model, seq.image_positions), load_tokenizer(model_dir), load_vq(model_dir, device),
                   layout, spec, batch, cfg.default_cfg)

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

        m = read_manifest(engine)
        model_dir = model_dir or m["model"]["dir"]
        cfg = read_config(model_dir)
        check_manifest(m, config_digest=cfg.digest(), weights_digest=checkpoint_digest(model_dir), height=height,
                       width=width, prompt_budget=prompt_budget, batch=batch)
        a = m["build_args"]
        spec = ImageSpec(a["height"], a["width"], a["prompt_budget"])
        denoiser = load_denoiser(m, device)
        return cls(denoiser, load_tokenizer(model_dir), load_vq(model_dir, denoiser.device), cfg.layout, spec,
                   a["batch"], cfg.default_cfg)

    def _state(self, T: int) -> RunState:
        h, w = self.seq.grid
        if self.state is None or self.state.T != T:
            self.state = RunState(self.batch, h, w, self.layout.codebook, T, self.layout.mask, self.denoiser.device)
        return self.state

    def step(self, sampler) -> None:
        """One evaluation + one sampler step, all on the device."""
        s = sampler.s
        write_image_tokens(self.ids, self.positions, s.z, s.M, self.layout, self.tok_scratch)
        self.denoiser(self.ids, self.key_mask, self.logits)
        sampler.step(self.logits)

    def step_runner(self, sampler):
        """``self.step(sampler)``, replayed from one CUDA graph when the denoiser says its call
        can be captured (``graph_safe``: static buffers, no host sync) and runs on CUDA.

        Capture executes nothing, but the warm-up step before it does: the run-state and the
        generator are restored afterwards so the first replayed step is the run's first step.
        The denoiser's own evaluation graph is switched off for the warm-up and the capture: the
        step graph holds the evaluation's kernels, and a warm-up that captured the evaluation
        too would cost a second capture and a second graph pool for nothing.
        A capture that fails falls back to plain steps with a warning (never silently)."""
        if self.denoiser.device.type != "cuda" or not getattr(self.denoiser, "graph_safe", False):
            return lambda: self.step(sampler)
        import warnings

        s = sampler.s
        snapshot = {k: v.clone() for k, v in s.tensors().items()}
        ids, gen_state = self.ids.clone(), s.gen.get_state()
        own_graph = getattr(self.denoiser, "cuda_graph", None)  # switched off here, restored in `finally`
        if own_graph is not None:
            self.denoiser.cuda_graph = False
        try:
            side = torch.cuda.Stream(self.denoiser.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, allocator
                self.step(sampler)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(s.gen)  # replays advance the sampler's own generator
            with torch.cuda.graph(graph):
                self.step(sampler)
        except RuntimeError as e:
            warnings.warn(f"CUDA-graph capture of the step failed ({str(e).splitlines()[0][:120]}); running "
                          "steps without it", RuntimeWarning, stacklevel=2)
            graph = None
        finally:
            if own_graph is not None:
                self.denoiser.cuda_graph = own_graph
        for k, v in snapshot.items():
            getattr(s, k).copy_(v)
        self.ids.copy_(ids)
        s.gen.set_state(gen_state)
        return graph.replay if graph is not None else (lambda: self.step(sampler))

    def generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False):
        dev = self.denoiser.device
        # Current-device CUDA calls (streams, graph capture, synchronize) must mean the
        # denoiser's device, also for cuda:N with N > 0.
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            return self._generate_codes(prompts, cfg, progress)

    def _generate_codes(self, prompts: str | list[str], cfg: SamplerConfig, progress: bool = False):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != self.batch:
            raise ValueError(f"this pipeline runs batches of {self.batch} prompt(s), got {len(prompts)}")
        ids, key_mask = build_rows(self.tokenizer, prompts, self.seq)
        self.ids.copy_(ids)
        self.key_mask.copy_(key_mask)
        state = self._state(cfg.steps)
        state.reset(cfg.seed)
        sampler = make_sampler(cfg, state, self.default_cfg)
        step = self.step_runner(sampler)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, desc=cfg.name, unit="step", leave=False)
        dev = self.denoiser.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        evals = 0
        while evals < cfg.steps and state.any_masked():  # the one host read per step
            step()
            evals += 1
            if bar is not None:
                bar.update(1)
        sync()
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        h, w = self.seq.grid
        trace = state.read_trace(evals)
        trace["cfg"] = sampler.cfg.cfg  # the guidance scale used (the model's when SamplerConfig.cfg is None)
        return state.z.view(self.batch, h, w).clone(), trace, evals, seconds

    def __call__(self, prompts: str | list[str], cfg: SamplerConfig = SamplerConfig(),
                 progress: bool = False) -> GenerationResult:
        from PIL import Image

        codes, trace, evals, seconds = self.generate_codes(prompts, cfg, progress)
        t0 = time.perf_counter()
        rgb = to_uint8(self.vq.decode(codes))
        decode_seconds = time.perf_counter() - t0
        trace["evaluations"] = evals
        trace["seconds"] = seconds
        return GenerationResult([Image.fromarray(a) for a in rgb], codes.cpu().numpy(), trace, evals, seconds,
                                decode_seconds)
