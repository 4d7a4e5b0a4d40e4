"""ladr-rt command line: maps options onto the config dataclasses, nothing else."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .config import SAMPLERS, ImageSpec, SamplerConfig
from .fileio import atomic_write

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


class UserError(click.ClickException):
    """One line on stderr, exit code 1."""


def _writable(path: str, flag: str) -> Path:
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: directory {parent} is not writable; choose another path")
    return p


def _device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError("--device cuda requested but torch sees no CUDA device; use --device cpu")
        if d.index is not None and d.index >= n:
            raise UserError(f"--device {device}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
    elif d.type != "cpu":
        raise UserError(f"--device {device!r}: ladr-rt runs on cpu or cuda")
    if dtype == "auto":
        dtype = "bf16" if d.type == "cuda" else "fp32"
    from .checkpoint import DTYPES

    return device, DTYPES[dtype]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ladr-rt")
def main() -> None:
    """Low-latency masked discrete-diffusion text-to-image (Lumina-DiMOO) with the LADR sampler."""


@main.command()
@click.option("--model", "model_dir", type=str, default=None,
              help="Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer, vqvae/).  "
                   "[default: the testbed model shipped in the package]")
@click.option("--engine", default=None,
              help="Run an engine from `ladr-rt build --out engines/NAME` instead of the eager model; --model, "
                   "--height, --width and --prompt-budget then default to the engine's.")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--height", type=int, default=None,
              help="Image height in pixels (multiple of 16)  [default: the model's default size]")
@click.option("--width", type=int, default=None,
              help="Image width in pixels (multiple of 16)  [default: the model's default size]")
@click.option("--prompt-budget", type=int, default=None,
              help=f"Text tokens per row (prompt + template), left-padded.  [default: {ImageSpec.prompt_budget}, "
                   "or the engine's]")
@click.option("--steps", type=int, default=SamplerConfig.steps, help="Schedule length T (max evaluations).")
@click.option("--cfg", type=float, default=None,
              help="Classifier-free guidance scale s_cfg.  [default: the model's (config.json ladr_default_cfg), "
                   "else 4.0]")
@click.option("--temperature", type=float, default=SamplerConfig.temperature,
              help="Sampling temperature (0 = greedy, deterministic).")
@click.option("--seed", type=int, default=SamplerConfig.seed, help="Random seed; same seed, same image.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=SamplerConfig.name, help="Unmasking rule.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto",
              help="Weights/activations precision for the eager backend (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--out", default="out.png", help="Output PNG path.")
@click.option("--save-tokens", default=None, help="Also write the final code grid [H, W] (int64) as .npy.")
@click.option("--trace", "trace_path", default=None,
              help="Also write per-step masked/rescued counts, t_eff, evaluations and seconds as JSON.")
@click.option("--progress/--no-progress", default=True, help="Progress bar over steps (stderr).")
def generate(model_dir, engine, prompt, height, width, prompt_budget, steps, cfg, temperature, seed, sampler, device,
             dtype, out, save_tokens, trace_path, progress) -> None:
    """Prompt -> PNG with the eager model, or with an engine from `ladr-rt build`."""
    from .checkpoint import CheckpointError
    from .tokens import PromptTooLong

    scfg = SamplerConfig(name=sampler, steps=steps, cfg=cfg, temperature=temperature, seed=seed)
    out_p = _writable(out, "--out")
    tok_p = _writable(save_tokens, "--save-tokens") if save_tokens else None
    trace_p = _writable(trace_path, "--trace") if trace_path else None
    try:
        scfg.validate()
        from .pipeline import LadrPipeline

        if engine is not None:
            if device != "auto":
                device = _device_dtype(device, "fp32")[0]  # validate; the manifest picks the runner
            pipe = LadrPipeline.from_engine(engine, device, height, width, prompt_budget, model_dir=model_dir)
        else:
            dev, dt = _device_dtype(device, dtype)
            pipe = LadrPipeline.from_pretrained(model_dir, height, width, prompt_budget, dtype=dt, device=dev)
        res = pipe(prompt, scfg, progress=progress)
        dev, (height, width) = pipe.denoiser.device, (pipe.seq.spec.height, pipe.seq.spec.width)
    except (CheckpointError, PromptTooLong, ValueError) as e:
        raise UserError(str(e)) from None
    atomic_write(out_p, lambda t: res.images[0].save(t, format="PNG"))
    if tok_p:
        import numpy as np

        def save_npy(t: str) -> None:
            with open(t, "wb") as f:  # a file object: np.save would append .npy to a bare name
                np.save(f, res.codes[0])

        atomic_write(tok_p, save_npy)
    if trace_p:
        trace = {"sampler": sampler, "steps": steps, "cfg": res.trace["cfg"], "temperature": temperature, "seed": seed,
                 "height": height, "width": width, "evaluations": res.evaluations, "seconds": res.seconds,
                 "decode_seconds": res.decode_seconds, "masked": res.trace["masked"][0],
                 "rescued": res.trace["rescued"][0], "t_eff": res.trace["t_eff"][0]}
        atomic_write(trace_p, lambda t: Path(t).write_text(json.dumps(trace, indent=1) + "\n"))
    click.echo(f"{out}: {res.evaluations} evaluations, {res.seconds:.2f} s sampling + "
               f"{res.decode_seconds:.2f} s VQ decode ({sampler}, {pipe.denoiser.name}, {dev})")


@main.command()
@click.option("--model", default=None, help="Hugging Face checkpoint directory to build from.")
@click.option("--height", type=int, default=None, help="Image height in pixels (multiple of 16)  [default: 512]")
@click.option("--width", type=int, default=None, help="Image width in pixels (multiple of 16)  [default: 512]")
@click.option("--prompt-budget", type=int, default=None,
              help=f"Text tokens per row the engine holds  [default: {ImageSpec.prompt_budget}]")
@click.option("--batch", type=int, default=None, help="Prompts per evaluation (2x rows: cond + uncond)  [default: 1]")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16")), default=None,
              help="Weights/activations precision of the graph  [default: fp32]")
@click.option("--backend", type=click.Choice(("onnx", "tensorrt")), default=None,
              help="onnx: NAME.onnx for onnxruntime; tensorrt: also NAME.plan (needs a GPU)  [default: onnx]")
@click.option("--out", default=None, help="Engine path engines/NAME: writes NAME.onnx(.data), NAME.plan, NAME.json.")
@click.option("--profile", default=None,
              help="TOML build profile (export/*.toml); options given here override it  [default: none]")
@click.option("--device", default=None, help="Device for export and validation  [default: cuda when available]")
@click.option("--validate/--no-validate", default=None,
              help="Compare the engine with the eager model and fail past the tolerance  [default: validate]")
def build(model, height, width, prompt_budget, batch, precision, backend, out, profile, device, validate) -> None:
    """Export the transformer at one fixed shape to ONNX (and TensorRT), validated, with a manifest."""
    from .build import build as run_build
    from .build import resolve_options

    try:
        opts = resolve_options(profile, model=model, height=height, width=width, prompt_budget=prompt_budget,
                               batch=batch, precision=precision, backend=backend, out=out, validate=validate)
        if device is not None:
            device = _device_dtype(device, "fp32")[0]
        manifest = run_build(opts, log=click.echo, device=device)
    except ValueError as e:  # CheckpointError, EngineError, BuildError, ValidationError, PromptTooLong
        raise UserError(str(e)) from None
    click.echo(f"engine ready: ladr-rt generate --engine {manifest.with_suffix('')} --prompt ...")


@main.command("init-tiny")
@click.argument("out_dir")
@click.option("--seed", type=int, default=0, help="Weight seed.")
@click.option("--layers", type=int, default=2, help="Transformer blocks.")
@click.option("--d-model", type=int, default=32, help="Hidden size.")
def init_tiny(out_dir, seed, layers, d_model) -> None:
    """Write a tiny random-weight DiMOO-format checkpoint (real vocab and special ids). Its images are noise."""
    from .tiny import tiny_config, write_tiny_checkpoint

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")
    p = write_tiny_checkpoint(out_dir, tiny_config(d_model=d_model, n_layers=layers), seed=seed)
    click.echo(f"wrote tiny checkpoint to {p} (random weights: its images are noise)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
