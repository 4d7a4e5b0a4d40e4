"""ladr-rt command line: maps options onto the config dataclasses, nothing else."""
from __future__ import annotations

import io
import json
import os
import sys
import threading
from pathlib import Path

import click

from .config import ATTENTION_CHOICES, CUDA_GRAPH_CHOICES, SAMPLERS, ImageSpec, LadrParams, RunOptions, SamplerConfig
from .fileio import Interrupted, atomic_write_all, signals_unwind

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16", "fp8")


class UserError(click.ClickException):
    """One line on stderr, exit code 1."""


# Image formats `--out` may name, by suffix (Pillow writes them from RGB).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF"}


def _writable(path: str, flag: str) -> Path:
    """Checked before any work: a bad output path fails in one line, not after sampling."""
    from .fileio import probe_writable

    if not path or "\0" in path:
        raise UserError(f"{flag} needs a file name")
    p = Path(path)
    real = Path(os.path.realpath(p))  # a symlink is written through to its target
    try:
        limit = os.pathconf(real.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    n = len(os.fsencode(real.name))
    if n > limit:
        raise UserError(f"{flag}: the file name {real.name[:24]}… is {n} bytes, over this file system's limit of "
                        f"{limit}; use a shorter name")
    if real.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if real.exists() and not real.is_file():
        raise UserError(f"{flag} {path} exists and is not a regular file (a device or pipe); give a file name")
    if not real.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {p.parent} does not exist; create it first")
    try:
        probe_writable(real)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create files in {p.parent} ({e.strerror or e}); choose another "
                        "path") from None
    return real


def _report(line: str, done: str) -> None:
    """The command's stdout line, after its work: stdout on a full device or closed early
    (``| head -c0``) is one line on stderr saying what was done, and exit 1 (the report is lost)."""
    try:
        click.echo(line)
    except OSError as e:
        _drop_stdout()
        raise UserError(f"{done}, but its report could not go to stdout ({e.strerror or e})") from None


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null, so the interpreter's flush at exit does not fail again (a
    second message and exit code 120)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # in-process runners give stdout without a descriptor
        pass


def _image_format(path: Path) -> str:
    from PIL import Image

    Image.init()  # registers every save plugin (Image.SAVE is filled lazily)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        have = ", ".join(k for k, v in IMAGE_FORMATS.items() if v in Image.SAVE)
        raise UserError(f"--out {path.name}: unknown image suffix {path.suffix or '(none)'!r}; use one of {have}")
    return fmt


class GenerateInterrupted(Interrupted):
    def __init__(self, signum: int):
        super().__init__(signum, "generate")
        self.message = self.message("no output was written")


class InitInterrupted(Interrupted):
    def __init__(self, signum: int):
        super().__init__(signum, "init-tiny")
        self.message = self.message("its temp directory was removed and nothing was written")


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
    if dtype == "fp8":  # a GPU without fp8 tensor cores is refused before anything loads
        from .fp8 import Fp8Unsupported, check_fp8_device

        try:
            check_fp8_device(d)
        except Fp8Unsupported as e:
            raise UserError(str(e)) from None
    from .checkpoint import resolve_dtype

    return device, resolve_dtype(dtype, d)


# A run estimated past a minute says so before it starts; under LONG_RUN_FLOPS no device
# reaches a minute (it would take < 17 GFLOP/s), so nothing is measured.
LONG_RUN_SECONDS = 60.0
LONG_RUN_FLOPS = 1e12
# After Ctrl-C/SIGTERM the run stops at its next step boundary; one evaluation that is still
# running after this long (a huge size on a CPU) is not waited for: the process exits, and as
# nothing is written before sampling ends, nothing is left behind.
STOP_GRACE_SECONDS = 2.0


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def _interrupt_line(e: BaseException) -> tuple[str, int]:
    """What a stopped run says, and its exit code: 130 for Ctrl-C, 128 + N for SIGTERM/SIGHUP."""
    if isinstance(e, Interrupted):
        return f"Error: {e.message}", e.code
    return "Error: interrupted (Ctrl-C); no output was written", 130


def _interruptible(work):
    """``work(stop)`` on a worker thread while this (main) thread waits for it, so Ctrl-C and
    SIGTERM are handled at once even while one evaluation runs for minutes in C (Python runs
    signal handlers only between bytecodes of the main thread). On a signal: ``stop`` is set
    (the pipeline ends at its next step), and if the step in flight is not through within
    STOP_GRACE_SECONDS the process exits without waiting for it."""
    stop, done = threading.Event(), threading.Event()
    box: dict = {}

    def run():
        try:
            box["value"] = work(stop)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the main thread
            box["error"] = e
        finally:
            done.set()

    # Waited for through an Event, not Thread.join: a join interrupted by a signal marks the
    # thread stopped while it still runs (Python 3.11, bpo-45274's fix).
    threading.Thread(target=run, name="ladr-rt-generate", daemon=True).start()
    try:
        while not done.wait(0.1):  # a timed wait: the main thread wakes to run signal handlers
            pass
    except BaseException as e:
        stop.set()
        if not done.wait(STOP_GRACE_SECONDS):
            line, code = _interrupt_line(e)
            click.echo(line, err=True)
            sys.stderr.flush()
            os._exit(code)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


LADR_HELP = ("LADR phase table, KEY=VALUE pairs separated by commas (repeatable), for --sampler ladr or "
             "ladr-delayed: e.g. tau_refine=0.05,alpha_refine=0.3. Keys, with the paper's values (the default): "
             + LadrParams().table().replace(",", ", ") + ". tau_* and alpha_* and the phase bounds are 0 to 1, "
             "explore_until < refine_from, tau_refine=none lets every candidate through, kernel is odd.")


def ladr_option(f):
    return click.option("--ladr", "ladr", multiple=True, metavar="KEY=VALUE,...", help=LADR_HELP,
                        show_default=False)(f)


def _ladr(texts: tuple[str, ...], sampler: str) -> LadrParams:
    """No --ladr: the paper's table; else the table the option names, validated by config."""
    if not texts:
        return LadrParams()
    try:
        return LadrParams.from_option(texts, sampler)
    except ValueError as e:
        raise UserError(str(e)) from None


def runtime_options(f):
    """--cuda-graph and --attention: how the eager model runs (config.RunOptions)."""
    f = click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default="auto",
                     help="Attention kernel of the eager model (auto: cuDNN attention on CUDA, SDPA elsewhere; "
                          "docs/attention.md).")(f)
    return click.option("--cuda-graph", "cuda_graph", type=click.Choice(CUDA_GRAPH_CHOICES), default="auto",
                        help="Run each step of the eager model from a captured CUDA graph (on: CUDA only; auto: "
                             "the device's default, docs/cuda-graphs.md).")(f)


def _run_options(cuda_graph: str, attention: str, engine, device: str | None) -> RunOptions:
    """The options, refused in one line where they cannot apply (an engine; a forced CUDA-only
    choice on another device)."""
    opts = RunOptions(cuda_graph=cuda_graph, attention=attention)
    try:
        if engine is not None:
            opts.refuse_for_engine()
        elif device is not None:
            opts.validate(device.split(":")[0])
    except ValueError as e:
        raise UserError(str(e)) from None
    return opts


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class OneLineErrors(click.Group):
    """Every error is one stderr line: click's usage errors print a usage block and a blank line
    before the message, which reads as three problems; here it is the message and where help is."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        try:
            os.getcwd()
        except OSError:  # deleted under us: torch's oneMKL would abort at import with "FATAL ERROR"
            click.echo("Error: the current directory no longer exists (deleted?); cd to an existing directory "
                       "and run the command again", err=True)
            sys.exit(1)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as e:  # bare `ladr-rt`: the help text is the answer
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = f"`{e.ctx.command_path} --help`" if e.ctx is not None else "`ladr-rt --help`"
            click.echo(f"Error: {e.format_message()} (see {where})", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except OSError as e:  # commands turn their own OSErrors into one line: this is stdout (--help | head -c0)
            _drop_stdout()
            click.echo(f"Error: cannot write to stdout ({e.strerror or e})", err=True)
            sys.exit(1)
        except (click.Abort, Interrupted) as e:  # Ctrl-C; SIGTERM/SIGHUP unwound: say what was left
            line, code = _interrupt_line(e)
            click.echo(line, err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
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
@click.option("--prompt", required=True,
              help="Text prompt. Words the model does not know are ignored, with a warning; `ladr-rt vocab "
                   "[--model DIR]` lists the ones it knows.")
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
              help="Weights/activations precision for the eager backend (auto: bf16 on CUDA, fp32 on CPU; fp8: "
                   "e4m3 weights in the transformer's linear layers, the rest bf16 on CUDA / fp32 on CPU; needs "
                   "compute capability 8.9+ on CUDA).")
@click.option("--out", default="out.png", help="Output PNG path.")
@click.option("--save-tokens", default=None, help="Also write the final code grid [H, W] (int64) as .npy.")
@click.option("--trace", "trace_path", default=None,
              help="Also write per-step masked/rescued counts, t_eff, evaluations and seconds as JSON.")
@click.option("--progress/--no-progress", default=True, help="Progress bar over steps (stderr).")
@ladr_option
@runtime_options
def generate(model_dir, engine, prompt, height, width, prompt_budget, steps, cfg, temperature, seed, sampler, device,
             dtype, out, save_tokens, trace_path, progress, ladr, cuda_graph, attention) -> None:
    """Prompt -> PNG with the eager model, or with an engine from `ladr-rt build`."""
    with signals_unwind(GenerateInterrupted):
        _generate(model_dir, engine, prompt, height, width, prompt_budget, steps, cfg, temperature, seed, sampler,
                  device, dtype, out, save_tokens, trace_path, progress, ladr, cuda_graph, attention)


def _generate(model_dir, engine, prompt, height, width, prompt_budget, steps, cfg, temperature, seed, sampler, device,
              dtype, out, save_tokens, trace_path, progress, ladr=(), cuda_graph="auto", attention="auto") -> None:
    from .tokens import check_prompt

    scfg = SamplerConfig(name=sampler, steps=steps, cfg=cfg, temperature=temperature, seed=seed,
                         ladr=_ladr(ladr, sampler))
    try:
        scfg.validate()
        check_prompt(prompt)  # sizes are checked by the pipeline, before anything heavy loads
    except ValueError as e:
        raise UserError(str(e)) from None
    outputs = {"--out": out, "--save-tokens": save_tokens, "--trace": trace_path}
    paths = {flag: _writable(p, flag) for flag, p in outputs.items() if p is not None}
    seen: dict[Path, str] = {}
    for flag, p in paths.items():
        if p in seen:
            raise UserError(f"{seen[p]} and {flag} name the same file {outputs[flag]}; give each output its own path")
        seen[p] = flag
    fmt = _image_format(paths["--out"])
    if engine is not None and dtype != "auto":
        raise UserError("--dtype sets the eager model's precision; an engine's precision was fixed by `ladr-rt build "
                        "--precision`, so leave --dtype out with --engine")
    run_opts = _run_options(cuda_graph, attention, engine, None)
    try:
        from .pipeline import LadrPipeline

        if engine is not None:
            if device != "auto":
                device = _device_dtype(device, "fp32")[0]  # validate; the manifest picks the runner
            pipe = LadrPipeline.from_engine(engine, device, height, width, prompt_budget, model_dir=model_dir)
        else:
            dev, dt = _device_dtype(device, dtype)
            run_opts = _run_options(cuda_graph, attention, None, dev)
            pipe = LadrPipeline.from_pretrained(model_dir, height, width, prompt_budget, dtype=dt, device=dev,
                                                options=run_opts)
        dev, (height, width) = pipe.denoiser.device, (pipe.seq.spec.height, pipe.seq.spec.width)
        warning = pipe.prompt_warning(prompt)
        if warning:
            click.echo(f"warning: {warning}", err=True)
        flops = pipe.sampling_flops(scfg)
        if flops is not None and flops > LONG_RUN_FLOPS:  # only then is the ~0.3 s measurement worth it
            est = pipe.estimate_seconds(scfg)
            if est > LONG_RUN_SECONDS:
                click.echo(f"ladr-rt generate: {height}x{width} with {steps} steps on {dev} is "
                           f"{flops / 1e12:,.0f} TFLOP: at least {_duration(est)} at this device's measured matmul "
                           "rate; Ctrl-C stops it (a smaller --height/--width or fewer --steps is faster)", err=True)
        res = _interruptible(lambda stop: pipe(prompt, scfg, progress=progress, stop=stop))
    except ValueError as e:  # CheckpointError, EngineError, PromptError, NonFiniteLogits, ...
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{e.filename or 'a model file'}: {e.strerror or e}; check the path and its permissions") from None
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError, as are CPU allocator failures
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "allocate" not in str(e):
            raise
        raise UserError(f"out of memory running {height or 'the default'}x{width or 'default'} on {device} "
                        f"({str(e).splitlines()[0][:100]}); use a smaller --height/--width, --dtype bf16, or a device "
                        "with more memory") from None
    # Everything rendered in memory first, then written as one unit: all outputs or none.
    files = []
    buf = io.BytesIO()
    save_kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    res.images[0].save(buf, format=fmt, **save_kw)
    files.append((paths["--out"], buf.getvalue()))
    if "--save-tokens" in paths:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, res.codes[0])  # a file object: np.save would append .npy to a bare name
        files.append((paths["--save-tokens"], buf.getvalue()))
    if "--trace" in paths:
        trace = {"sampler": sampler, "steps": steps, "cfg": res.trace["cfg"], "temperature": temperature, "seed": seed,
                 "height": height, "width": width, "evaluations": res.evaluations, "seconds": res.seconds,
                 "decode_seconds": res.decode_seconds, "capture_seconds": res.trace.get("capture_seconds", 0.0),
                 "ladr": res.trace["ladr"], "masked": res.trace["masked"][0],
                 "rescued": res.trace["rescued"][0], "t_eff": res.trace["t_eff"][0]}
        files.append((paths["--trace"], (json.dumps(trace, indent=1) + "\n").encode()))
    try:
        atomic_write_all(files)
    except OSError as e:
        raise UserError(f"writing {e.filename or out} failed ({e.strerror or e}); nothing was written") from None
    _report(f"{out}: {res.evaluations} evaluations, {res.seconds:.2f} s sampling + "
            f"{res.decode_seconds:.2f} s VQ decode ({sampler}, {pipe.denoiser.name}, {dev})",
            f"{', '.join(str(outputs[f]) for f in paths)} written")


@main.command()
@click.option("--model", "model_dir", type=str, default=None,
              help="Hugging Face checkpoint directory.  [default: the testbed model shipped in the package]")
def vocab(model_dir) -> None:
    """List the words the model's tokenizer knows, one per line (prompt words outside it are ignored)."""
    from .checkpoint import load_tokenizer
    from .tokens import vocabulary

    if model_dir is None:
        from .shipped import model_dir as shipped

        model_dir = shipped()
    try:
        words = vocabulary(load_tokenizer(model_dir))
    except ValueError as e:  # CheckpointError
        raise UserError(str(e)) from None
    click.echo("\n".join(words))


@main.command()
@click.option("--model", default=None, help="Hugging Face checkpoint directory to build from.")
@click.option("--height", type=int, default=None, help="Image height in pixels (multiple of 16)  [default: 512]")
@click.option("--width", type=int, default=None, help="Image width in pixels (multiple of 16)  [default: 512]")
@click.option("--prompt-budget", type=int, default=None,
              help=f"Text tokens per row the engine holds  [default: {ImageSpec.prompt_budget}]")
@click.option("--batch", type=int, default=None, help="Prompts per evaluation (2x rows: cond + uncond)  [default: 1]")
@click.option("--precision", type=click.Choice(("fp32", "fp16", "bf16", "fp8")), default=None,
              help="Weights/activations precision of the graph (fp8: not for onnx/tensorrt)  [default: fp32]")
@click.option("--backend", type=click.Choice(("onnx", "tensorrt", "inductor")), default=None,
              help="onnx: NAME.onnx for onnxruntime; tensorrt: also NAME.plan (needs a GPU); inductor: NAME.pt2, "
                   "an AOTInductor package for --device (needs a C++ compiler; Triton on CUDA)  [default: onnx]")
@click.option("--out", default=None,
              help="Engine path engines/NAME: writes NAME.onnx(.data), NAME.plan or NAME.pt2, and NAME.json.")
@click.option("--profile", default=None,
              help="TOML build profile (export/*.toml); options given here override it  [default: none]")
@click.option("--device", default=None,
              help="Device for export and validation; for inductor also the device the package runs on  "
                   "[default: cuda when available]")
@click.option("--validate/--no-validate", default=None,
              help="Compare the engine with the eager model and fail past the tolerance  [default: validate]")
@click.option("--keep-onnx/--no-keep-onnx", default=None,
              help="Keep NAME.onnx(.data) beside a TensorRT plan (as large as the plan)  [default: keep for "
                   "--backend onnx, where it is the engine; drop for tensorrt]")
def build(model, height, width, prompt_budget, batch, precision, backend, out, profile, device, validate,
          keep_onnx) -> None:
    """Build the transformer at one fixed shape into an engine (ONNX, TensorRT plan or AOTInductor package),
    validated against the eager model, with a manifest."""
    from .build import build as run_build
    from .build import resolve_options

    try:
        opts = resolve_options(profile, model=model, height=height, width=width, prompt_budget=prompt_budget,
                               batch=batch, precision=precision, backend=backend, out=out, validate=validate,
                               keep_onnx=keep_onnx)
        if device is not None:
            device = _device_dtype(device, "fp32")[0]
        manifest = run_build(opts, log=click.echo, device=device)
    except ValueError as e:  # CheckpointError, EngineError, BuildError, ValidationError, PromptTooLong
        raise UserError(str(e)) from None
    except OSError as e:  # a full disk or an unwritable file mid-build
        raise UserError(f"build failed writing {e.filename or out} ({e.strerror or e}); the engine was not "
                        "installed: free space or fix permissions, then rebuild") from None
    click.echo(f"engine ready: ladr-rt generate --engine {manifest.with_suffix('')} --prompt ...")


@main.command("init-tiny")
@click.argument("out_dir")
@click.option("--seed", type=int, default=0, help="Weight seed.")
@click.option("--layers", type=int, default=2, help="Transformer blocks.")
@click.option("--d-model", type=int, default=32, help="Hidden size.")
def init_tiny(out_dir, seed, layers, d_model) -> None:
    """Write a tiny random-weight DiMOO-format checkpoint (real vocab and special ids). Its images are noise."""
    from .config import MAX_SEED, ModelConfig
    from .tiny import tiny_config, write_tiny_checkpoint

    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {seed}")
    if not 1 <= layers <= 64:
        raise UserError(f"--layers must be between 1 and 64 (a tiny checkpoint), got {layers}")
    if not 8 <= d_model <= 1024 or d_model % 8:
        raise UserError(f"--d-model must be a multiple of 8 between 8 and 1024 (4 heads of an even size), got {d_model}")
    cfg = tiny_config(d_model=d_model, n_layers=layers)
    try:
        ModelConfig.from_json_dict(cfg.to_json_dict())  # the checks a load would make, before writing
        with signals_unwind(InitInterrupted):
            p = write_tiny_checkpoint(out_dir, cfg, seed=seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{out_dir}: {e.strerror or e}; choose a writable directory") from None
    _report(f"wrote tiny checkpoint to {p} (random weights: its images are noise)", f"{p} written")


@main.command()
@click.option("--model", "model_dir", type=str, default=None,
              help="Hugging Face checkpoint directory.  [default: the testbed model shipped in the package]")
@click.option("--engine", default=None, help="Serve an engine from `ladr-rt build --out engines/NAME`.")
@click.option("--batch", type=int, default=None,
              help="Slots (images in flight).  [default: 4; 1 with --mode sequential; an engine's own]")
@click.option("--mode", type=click.Choice(("continuous", "static", "sequential")), default="continuous",
              help="continuous: a free slot takes a request at any step; static: only a whole free batch; "
                   "sequential: one at a time.")
@click.option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, help="TCP port (0: any free port).")
@click.option("--max-queue", type=int, default=64, help="Requests waiting for a slot before 429.")
@click.option("--api-key", default=None, envvar="LADR_RT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1 requests.  [default: no auth]")
@click.option("--height", type=int, default=None, help="Served image height.  [default: the model's]")
@click.option("--width", type=int, default=None, help="Served image width.  [default: the model's]")
@click.option("--prompt-budget", type=int, default=None, help=f"Text tokens per row.  [default: {ImageSpec.prompt_budget}]")
@click.option("--steps", type=int, default=SamplerConfig.steps, help="Schedule length T: a request's default and most.")
@click.option("--cfg", type=float, default=None, help="Default guidance scale.  [default: the model's]")
@click.option("--temperature", type=float, default=SamplerConfig.temperature, help="Sampling temperature.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=SamplerConfig.name, help="Unmasking rule.")
@click.option("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available).")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", help="Eager precision (auto: bf16 on CUDA; fp8: e4m3 linear layers, see generate --help).")
@click.option("--replicas", type=int, default=None,
              help="Run on Ray Serve with N replicas (one per GPU on cuda, else CPU processes); with --autoscale, "
                   "the count to start with.  [default: no Ray, one process]")
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="Run on Ray Serve and let Ray add/remove replicas between MIN and MAX by requests in flight.")
@click.option("--replica-cpus", type=float, default=None,
              help="Ray CPUs (= torch threads) per CPU replica.  [default: this machine's CPUs / the most replicas]")
@click.option("--served-model-name", default=None,
              help="The model id GET /v1/models lists and a request's 'model' must match.  [default: the --model or "
                   "--engine directory's name; ladr-rt-testbed for the shipped model]")
@click.option("--log-prompts", is_flag=True, help="Write each request's prompt in its access-log line.")
@click.option("--shutdown-grace", type=float, default=30.0,
              help="Seconds a SIGTERM/SIGINT/SIGHUP leaves requests in flight to finish; the rest are answered 503.")
@click.option("--read-timeout", type=float, default=10.0,
              help="Seconds a request's body may take to arrive; a stalled upload is answered 408.")
@ladr_option
@runtime_options
def serve(model_dir, engine, batch, mode, host, port, max_queue, api_key, height, width, prompt_budget, steps, cfg,
          temperature, sampler, device, dtype, ladr, replicas, autoscale, replica_cpus, served_model_name,
          log_prompts, shutdown_grace, read_timeout, cuda_graph, attention) -> None:
    """HTTP server, OpenAI Images API shape: POST /v1/images/generations, GET /v1/models, GET /health,
    GET /metrics (docs/images-api.md)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"ladr-rt serve needs {e.name}: pip install 'ladr-rt[serve]'") from None
    from .serve.server import ScaleOptions, ServeError, ServeOptions, run

    if api_key is None and "LADR_RT_API_KEY" in os.environ:
        # click reads an empty variable as unset, which would start an open server when a
        # deployment's secret did not render: it is refused like any other bad key.
        api_key = os.environ["LADR_RT_API_KEY"]
    table = _ladr(ladr, sampler)  # before the device probe: a typo'd table is the first thing said
    if engine is not None and dtype != "auto":
        raise UserError("--dtype sets the eager model's precision; an engine's was fixed by `ladr-rt build`")
    if engine is not None:
        dev, dt = (_device_dtype(device, "fp32")[0] if device != "auto" else "auto"), None
    else:
        dev, dt = _device_dtype(device, dtype)
    run_opts = _run_options(cuda_graph, attention, engine, None if engine is not None else dev)
    opts = ServeOptions(model=model_dir, engine=engine, batch=batch, mode=mode, host=host, port=port,
                        max_queue=max_queue, api_key=api_key, device=dev, dtype=dt,
                        sampler=SamplerConfig(name=sampler, steps=steps, cfg=cfg, temperature=temperature, ladr=table),
                        height=height, width=width, prompt_budget=prompt_budget,
                        served_model_name=served_model_name, log_prompts=log_prompts, run=run_opts,
                        shutdown_grace=shutdown_grace, read_timeout=read_timeout)
    scale = ScaleOptions(replicas=replicas, autoscale=autoscale, replica_cpus=replica_cpus)
    log = lambda m: click.echo(f"ladr-rt serve: {m}", err=True)  # noqa: E731
    try:
        opts.validate()
        scale.validate(opts)
        opts.check_shape()  # before Ray starts or the port is bound
        if scale.enabled:
            try:
                from .serve.ray_serve import run as run_on_ray
            except ImportError as e:
                if not (e.name or "").startswith("ray"):
                    raise
                raise UserError("--replicas/--autoscale run on Ray Serve, which is not installed: "
                                "pip install 'ladr-rt[serve]'") from None
            stopped = run_on_ray(opts, scale, log=log)
        else:
            stopped = run(opts, log=log)
    except ServeError as e:
        raise UserError(str(e)) from None
    if isinstance(stopped, str):  # the Ray path: a signal's name
        click.echo(f"ladr-rt serve: stopped by {stopped}", err=True)
    elif stopped.signal:
        click.echo(f"ladr-rt serve: stopped by {stopped.signal}: {stopped.summary}", err=True)
    if not isinstance(stopped, str) and stopped.step_running:
        # The scheduler's thread is inside a torch call that may take minutes; a normal exit
        # would tear the interpreter down under it (std::terminate, SIGABRT). Every client has
        # its answer, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
