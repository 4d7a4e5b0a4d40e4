"""``ladr-rt build``: eager model -> fixed-shape ONNX (validated) -> TensorRT plan, + manifest.

Stages, each timed and reported: export, validate, build (TensorRT only), manifest.
Everything is written into a hidden temp directory beside the target and moved into place
at the end, manifest last: a build that dies at any point leaves nothing that
``generate --engine`` accepts (it reads the manifest first, and the manifest is written
only after every file it names is in place).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import ImageSpec
from .engines.graph import INPUTS, OUTPUTS, EngineGraph
from .engines.manifest import BACKENDS, FORMAT, PRECISIONS, EngineError, engine_paths, write_manifest

VALIDATION_PROMPTS = ("a red circle above a blue square", "two green triangles on a white background",
                      "a cat in a tree")


class BuildError(EngineError):
    pass


class ValidationError(BuildError):
    pass


@dataclass(frozen=True)
class Tolerance:
    rel_err: float  # max |engine - eager| / max |eager|, per output
    top1: float  # fraction of positions whose argmax over the codebook agrees
    cosine: float
    reason: str


# Eager runs the same precision as the graph, so the gap is kernel order and fusion only.
TOLERANCES = {
    "fp32": Tolerance(1e-4, 0.999, 0.99999, "same fp32 math; only reduction order differs"),
    "fp16": Tolerance(2e-2, 0.97, 0.999, "10-bit mantissa: fused kernels round intermediates at other points"),
    "bf16": Tolerance(5e-2, 0.95, 0.995, "7-bit mantissa: a rounding step per op, placed differently by fusion"),
}


@dataclass(frozen=True)
class BuildOptions:
    model: str
    out: str
    height: int = 512
    width: int = 512
    prompt_budget: int = ImageSpec.prompt_budget
    batch: int = 1
    precision: str = "fp32"  # runs on every backend; GPU profiles pick bf16
    backend: str = "onnx"
    opset: int = 20
    validate: bool = True
    workspace_gib: float = 8.0  # TensorRT builder memory pool
    timing_cache: str | None = None  # TensorRT timing cache file, reused across builds

    def validated(self) -> "BuildOptions":
        if self.precision not in PRECISIONS:
            raise BuildError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise BuildError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.batch < 1:
            raise BuildError(f"--batch must be >= 1, got {self.batch}")
        ImageSpec(self.height, self.width, self.prompt_budget).validate()
        engine_paths(self.out)
        return self


PROFILE_KEYS = {f.name for f in dataclasses.fields(BuildOptions)} - {"out"}


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"--profile {p}: no such file (profiles live in export/, e.g. export/tiny-fp32.toml)")
    try:
        d = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"--profile {p} is not valid TOML ({e})") from None
    bad = sorted(set(d) - PROFILE_KEYS)
    if bad:
        raise BuildError(f"--profile {p}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(PROFILE_KEYS))}")
    return d


def resolve_options(profile: str | None = None, **given: Any) -> BuildOptions:
    """Command-line values over profile values over BuildOptions defaults."""
    d = load_profile(profile) if profile else {}
    d.update({k: v for k, v in given.items() if v is not None})
    if "model" not in d:
        raise BuildError("no model: pass --model DIR (or a --profile that names one)")
    if "out" not in d:
        raise BuildError("no output: pass --out engines/NAME")
    return BuildOptions(**d).validated()


# ------------------------------------------------------------------ stages

def export_onnx(graph: EngineGraph, path: Path, batch_rows: int, seq_len: int, opset: int = 20) -> None:
    """Fixed-shape export with every weight in ``<path>.data`` (external data: the 8B model
    is ~16 GB and protobuf stops at 2 GB). torch 2.13's dynamo exporter; SDPA with a boolean
    key mask lowers to MatMul/Softmax/Where, which ORT and TensorRT both run."""
    import warnings

    ids = torch.zeros(batch_rows, seq_len, dtype=torch.int32, device=graph.head.device)
    mask = torch.ones(batch_rows, seq_len, dtype=torch.bool, device=graph.head.device)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (ids, mask), str(path), dynamo=True, external_data=True, opset_version=opset,
                          input_names=list(INPUTS), output_names=list(OUTPUTS), optimize=True, verbose=False)
    if not Path(str(path) + ".data").is_file():
        raise BuildError(f"the exporter wrote no external data file beside {path}; this torch "
                         f"({torch.__version__}) is not supported for export: use torch>=2.6")


class _quiet_exporter:
    """The exporter prints per-pass progress on stdout; a build prints its own stage lines."""

    def __enter__(self):
        import contextlib
        import io
        import logging

        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()
        self._lvl = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("torch.onnx").setLevel(self._lvl)
        return self._cm.__exit__(*exc)


def check_onnx_file(path: Path) -> None:
    """Path-based checks: the checker follows external data, and the graph proto loads
    without pulling weights into memory (what an 8B export needs)."""
    import onnx

    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if names != (list(INPUTS), list(OUTPUTS)):
        raise BuildError(f"exported graph has I/O {names}, expected {list(INPUTS)} -> {list(OUTPUTS)}")


def validation_inputs(tokenizer, seq, batch: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real prompts in the engine's layout, teacher-forced at two points of a run: every
    image token masked (step 0) and half of them filled with codes (mid-run)."""
    from .tokens import build_rows

    prompts = [VALIDATION_PROMPTS[i % len(VALIDATION_PROMPTS)] for i in range(batch)]
    ids, mask = build_rows(tokenizer, prompts, seq)
    g = torch.Generator().manual_seed(seed)
    half = ids.clone()
    codes = torch.randint(0, seq.layout.codebook, (seq.n_image,), generator=g) + seq.layout.image_offset
    keep = torch.rand(seq.n_image, generator=g) < 0.5
    pos = seq.image_positions
    half[:, pos[keep]] = codes[keep]
    return [(ids.to(torch.int32), mask), (half.to(torch.int32), mask)]


def compare(engine: np.ndarray, eager: np.ndarray) -> dict[str, float]:
    """Per-output parity metrics (optimum-style): max abs, relative, cosine, top-1 agreement."""
    a, b = engine.astype(np.float64), eager.astype(np.float64)
    err = float(np.abs(a - b).max())
    scale = float(np.abs(b).max()) or 1.0
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return {"max_abs_err": err, "rel_err": err / scale, "cosine": cos, "top1": top1}


def check_tolerance(metrics: dict[str, float], tol: Tolerance, precision: str, what: str) -> None:
    bad = []
    if not metrics["rel_err"] <= tol.rel_err:  # `not <=` also catches NaN
        bad.append(f"rel err {metrics['rel_err']:.3g} > {tol.rel_err:g}")
    if not metrics["top1"] >= tol.top1:
        bad.append(f"top-1 agreement {metrics['top1']:.4f} < {tol.top1}")
    if not metrics["cosine"] >= tol.cosine:
        bad.append(f"cosine {metrics['cosine']:.6f} < {tol.cosine}")
    if bad:
        raise ValidationError(f"{what} does not match the eager model at {precision} ({'; '.join(bad)}; max abs err "
                              f"{metrics['max_abs_err']:.3g}): the exported graph is wrong, nothing was installed")


def validate_with(run: Callable[[torch.Tensor, torch.Tensor], np.ndarray], graph: EngineGraph,
                  inputs, precision: str, what: str) -> dict[str, float]:
    """Worst case over the validation inputs; raises ValidationError past the tolerance."""
    worst: dict[str, float] = {}
    for ids, mask in inputs:
        with torch.inference_mode():
            ref = graph(ids.to(graph.head.device), mask.to(graph.head.device)).float().cpu().numpy()
        m = compare(run(ids, mask), ref)
        for k, v in m.items():
            lower_is_worse = k in ("cosine", "top1")
            if k not in worst or (v < worst[k] if lower_is_worse else v > worst[k]) or np.isnan(v):
                worst[k] = v
    check_tolerance(worst, TOLERANCES[precision], precision, what)
    return worst


def ort_runner(path: Path, device: torch.device) -> Callable:
    from .engines.ort import open_session, providers_for

    try:
        providers = providers_for(device)
    except EngineError:  # torch on CUDA, onnxruntime CPU-only: validate the same graph on the CPU
        providers = ["CPUExecutionProvider"]
    sess = open_session(path, providers)

    def run(ids, mask):
        return sess.run(None, {"input_ids": ids.numpy(), "key_mask": mask.numpy()})[0]

    return run


# ------------------------------------------------------------------ the build

def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "ladr-rt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def build(opts: BuildOptions, log: Callable[[str], None] = print, device: str | None = None) -> Path:
    """Build the engine ``opts.out`` and return its manifest path."""
    from .checkpoint import DTYPES, checkpoint_digest, load_model, load_tokenizer, read_config
    from .tokens import SequenceLayout

    opts = opts.validated()
    out_dir, name = engine_paths(opts.out)
    if not out_dir.is_dir():
        raise BuildError(f"--out {opts.out}: directory {out_dir} does not exist; create it first")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.backend == "tensorrt":
        from .engines.trt import import_trt

        import_trt()  # fail before the export, not after it
        if not torch.cuda.is_available():
            raise BuildError("--backend tensorrt needs a CUDA GPU (TensorRT builds for the GPU it runs on); use "
                             "--backend onnx on this machine")
        dev = torch.device("cuda")
    cfg = read_config(opts.model)
    spec = ImageSpec(opts.height, opts.width, opts.prompt_budget)
    spec.validate(cfg.layout.vq_scale)
    seq = SequenceLayout(spec, cfg.layout)
    rows, L, N, K = 2 * opts.batch, seq.seq_len, seq.n_image, cfg.layout.codebook
    tokenizer = load_tokenizer(opts.model)
    inputs = validation_inputs(tokenizer, seq, opts.batch)  # also checks the templates fit the budget

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=out_dir))
    try:
        t0 = time.perf_counter()
        model = load_model(opts.model, dtype=DTYPES[opts.precision], device=dev)
        graph = EngineGraph.from_model(model, L, seq.image_positions)
        onnx_tmp = tmp / f"{name}.onnx"  # final name inside the temp dir: the .onnx refers to NAME.onnx.data
        export_onnx(graph, onnx_tmp, rows, L, opts.opset)
        check_onnx_file(onnx_tmp)
        size = onnx_tmp.stat().st_size + Path(str(onnx_tmp) + ".data").stat().st_size
        log(f"[export] {onnx_tmp.name}: {rows}x{L} tokens -> {rows}x{N}x{K} logits, {opts.precision}, "
            f"{size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")

        validation: dict[str, Any] = {"tolerance": dataclasses.asdict(TOLERANCES[opts.precision]),
                                      "inputs": len(inputs), "prompts": list(VALIDATION_PROMPTS)}
        if opts.validate:
            t0 = time.perf_counter()
            try:
                run = ort_runner(onnx_tmp, dev)
                validation["onnxruntime"] = validate_with(run, graph, inputs, opts.precision,
                                                          f"the ONNX graph (onnxruntime, {dev.type})")
                del run
            except EngineError as e:
                if "NOT_IMPLEMENTED" not in str(e) or opts.backend != "tensorrt":
                    if "NOT_IMPLEMENTED" in str(e):
                        raise BuildError(f"onnxruntime on {dev.type} has no {opts.precision} kernels for this graph, so "
                                         f"an onnx engine could not run here; use --precision fp32 or fp16, or "
                                         f"--backend tensorrt on a GPU") from None
                    raise
                validation["onnxruntime"] = f"skipped: onnxruntime on {dev.type} has no {opts.precision} kernels"
            m = validation.get("onnxruntime")
            if isinstance(m, dict):
                log(f"[validate] onnxruntime vs eager ({len(inputs)} inputs): max abs {m['max_abs_err']:.3g}, rel "
                    f"{m['rel_err']:.3g}, cosine {m['cosine']:.6f}, top-1 {m['top1']:.4f}, "
                    f"{time.perf_counter() - t0:.1f} s")

        files = [f"{name}.onnx", f"{name}.onnx.data"]
        gpu = None
        if opts.backend == "tensorrt":
            from .engines.trt import build_plan, compute_capability, plan_runner

            t0 = time.perf_counter()
            build_plan(onnx_tmp, tmp / f"{name}.plan", opts.precision, opts.workspace_gib, opts.timing_cache)
            gpu = {"name": torch.cuda.get_device_name(dev), "compute_capability": compute_capability(dev)}
            log(f"[build] {name}.plan ({gpu['name']}, sm {gpu['compute_capability']}), "
                f"{time.perf_counter() - t0:.1f} s")
            files.append(f"{name}.plan")
            if opts.validate:
                validation["tensorrt"] = validate_with(plan_runner(tmp / f"{name}.plan", rows, L, N, K, dev), graph,
                                                       inputs, opts.precision, "the TensorRT engine")
        del graph, model

        io = {"inputs": [{"name": "input_ids", "shape": [rows, L], "dtype": "int32"},
                         {"name": "key_mask", "shape": [rows, L], "dtype": "bool"}],
              "outputs": [{"name": "logits", "shape": [rows, N, K], "dtype": "float32"}]}
        manifest = {
            "format": FORMAT, "name": name, "backend": opts.backend, "precision": opts.precision,
            "runner": "tensorrt" if opts.backend == "tensorrt" else "onnxruntime",
            "build_args": {"model": str(opts.model), "height": opts.height, "width": opts.width,
                           "prompt_budget": opts.prompt_budget, "batch": opts.batch, "precision": opts.precision,
                           "backend": opts.backend, "out": str(out_dir / name)},
            "model": {"dir": str(Path(opts.model).resolve()), "config_digest": cfg.digest(),
                      "weights_digest": checkpoint_digest(opts.model), "config": cfg.to_json_dict()},
            "grid": list(seq.grid), "seq_len": L, "n_image": N, "image_start": seq.image_start,
            "layout": dataclasses.asdict(cfg.layout), "io": io,
            "files": {f: (tmp / f).stat().st_size for f in files},
            "versions": _versions(), "gpu": gpu, "validation": validation, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # Install: drop the old manifest first so no moment pairs it with new files, move the
        # files, write the manifest last.
        (out_dir / f"{name}.json").unlink(missing_ok=True)
        for stale in (f"{name}.onnx", f"{name}.onnx.data", f"{name}.plan"):
            if stale not in files:
                (out_dir / stale).unlink(missing_ok=True)
        for f in files:
            os.replace(tmp / f, out_dir / f)
        write_manifest(out_dir / f"{name}.json", manifest)
        log(f"[manifest] {out_dir / name}.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / f"{name}.json"
