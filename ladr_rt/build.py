"""``ladr-rt build``: eager model -> fixed-shape ONNX (validated) -> TensorRT plan, or -> an
AOTInductor ``.pt2`` package (``--backend inductor``, validated), + manifest.

Stages, each timed and reported: export, validate, build (TensorRT only), manifest.
Everything is written into a hidden temp directory ``.NAME.build-XXXXXXXX`` beside the
target and moved into place at the end, manifest last: a build that dies at any point
leaves nothing that ``generate --engine`` accepts (it reads the manifest first, and the
manifest is written only after every file it names is in place). SIGINT, SIGTERM and
SIGHUP unwind the build (temp directory removed); a build killed outright (SIGKILL, power
loss) leaves its temp directory, which the next build of the same engine removes. One
build per engine at a time: ``.NAME.lock`` (flock) refuses a second one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import ImageSpec
from .fileio import Interrupted, signals_unwind
from .engines.graph import INPUTS, OUTPUTS, EngineGraph
from .engines.manifest import (BACKENDS, FORMAT, PRECISIONS, RUNNERS, BuildError, EngineError, engine_files,
                               engine_paths, write_manifest)

VALIDATION_PROMPTS = ("a red circle above a blue square", "two green triangles on a white background",
                      "a cat in a tree")


class ValidationError(BuildError):
    pass


class BuildInterrupted(Interrupted):
    """SIGTERM/SIGHUP during a build (``fileio.signals_unwind``)."""

    def __init__(self, signum: int):
        super().__init__(signum, "build")
        self.message = self.message("its temp directory was removed and nothing was installed (an engine already "
                                    "there is untouched)")


@dataclass(frozen=True)
class Tolerance:
    rel_err: float  # max |engine - eager| / max |eager|, per output
    top1: float  # fraction of positions whose argmax over the codebook agrees (margin-aware: tie_rel)
    cosine: float
    reason: str
    # A position whose eager top-1/top-2 gap is within tie_rel * |top-1| (one rounding step of
    # the precision's mantissa: its machine epsilon) has no decidable argmax at that precision;
    # there the engine agrees if its pick is within that step of the eager maximum.
    tie_rel: float = 0.0


# Eager runs the same precision as the graph, so the gap is kernel order and fusion only.
TOLERANCES = {
    "fp32": Tolerance(1e-4, 0.999, 0.99999, "same fp32 math; only reduction order differs", 2.0 ** -23),
    "fp16": Tolerance(2e-2, 0.97, 0.999, "10-bit mantissa: fused kernels round intermediates at other points",
                      2.0 ** -10),
    "bf16": Tolerance(5e-2, 0.95, 0.995, "7-bit mantissa: a rounding step per op, placed differently by fusion",
                      2.0 ** -7),
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
    keep_onnx: bool | None = None  # None: keep for onnx (it is the engine), drop after a TensorRT build

    def validated(self) -> "BuildOptions":
        paths = {k: os.fspath(getattr(self, k)) for k in ("model", "out", "timing_cache")
                 if isinstance(getattr(self, k), os.PathLike)}
        if paths:  # a pathlib.Path from Python callers is as good as a string
            return dataclasses.replace(self, **paths).validated()
        for f in dataclasses.fields(self):
            bad = _field_problem(f.name, getattr(self, f.name))
            if bad:
                raise BuildError(f"{_flag(f.name)} {bad}")
        if self.precision == "fp8" and self.backend in ("onnx", "tensorrt"):
            raise BuildError(f"--precision fp8 is not offered with --backend {self.backend}: TensorRT's fp8 (and an fp8 "
                             "ONNX graph) needs Q/DQ nodes placed by a quantization toolkit, which ladr-rt does not "
                             "ship; build --precision bf16, or run fp8 eagerly with `ladr-rt generate --dtype fp8`")
        if self.precision not in PRECISIONS:
            raise BuildError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.backend not in BACKENDS:
            raise BuildError(f"--backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.batch < 1:
            raise BuildError(f"--batch must be >= 1, got {self.batch}")
        if self.keep_onnx is not None and self.backend == "inductor":
            raise BuildError("--keep-onnx/--no-keep-onnx: an inductor engine is its NAME.pt2 package and exports no "
                             "ONNX graph; leave the option out")
        if self.keep_onnx is False and self.backend == "onnx":
            raise BuildError("--no-keep-onnx: an onnx engine is its NAME.onnx file; --no-keep-onnx is for "
                             "--backend tensorrt builds, where the plan is the engine")
        ImageSpec(self.height, self.width, self.prompt_budget).validate()
        engine_paths(self.out)
        return self

    @property
    def keeps_onnx(self) -> bool:
        return self.keep_onnx if self.keep_onnx is not None else self.backend == "onnx"


_HINTS = typing.get_type_hints(BuildOptions)
PROFILE_KEYS = {f.name for f in dataclasses.fields(BuildOptions)} - {"out"}
PATH_KEYS = ("model", "timing_cache")  # in a profile: relative to the profile's directory
_EXPECT = {int: "an integer", float: "a number", bool: "true or false (a TOML boolean, unquoted)",
           str: "a string (in quotes)"}
_EXAMPLE = {"height": "512", "width": "512", "prompt_budget": "64", "batch": "1", "precision": '"bf16"',
            "backend": '"tensorrt"', "opset": "20", "validate": "true", "workspace_gib": "16.0",
            "timing_cache": '"../engines/timing.cache"', "keep_onnx": "false", "model": '"../ckpt/tiny"'}


def _flag(key: str) -> str:
    return {"workspace_gib": "workspace_gib", "timing_cache": "timing_cache", "opset": "opset"}.get(
        key, "--" + key.replace("_", "-"))


def _field_problem(key: str, v: Any) -> str | None:
    """What is wrong with value ``v`` for BuildOptions field ``key`` (type, then range), or None.
    bool is not an int here, although Python says it is; an int is a fine float."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if v is None and optional:
        return None
    ok = (type(v) is bool if base is bool else
          (type(v) is int) if base is int else
          (type(v) in (int, float)) if base is float else isinstance(v, base))
    if not ok:
        return f"must be {_EXPECT[base]}, got {_show_value(v)}"
    if key == "workspace_gib" and not (math.isfinite(v) and 0 < v <= 1024):
        return f"must be a positive, finite number of GiB (at most 1024), got {v!r}"
    if key in PATH_KEYS and not v.strip():
        return "must be a path, got an empty string"
    if key == "opset" and not 7 <= v <= 30:
        return f"must be an ONNX opset between 7 and 30 (the exporter writes 20), got {v}"
    return None


def _show_value(v: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)
    text = repr(v) if not isinstance(v, (list, dict)) else ""
    return f"{text} ({kind})".strip() if text else kind


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML profile: every key known, every value of its field's type. Relative paths in it
    (model, timing_cache) are taken relative to the profile's directory, so a profile means the
    same wherever the build runs from."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"--profile {p}: no such file (profiles live in export/, e.g. export/tiny-fp32.toml)")
    try:
        d = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise BuildError(f"--profile {p} is not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"--profile {p} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    bad = sorted(set(d) - PROFILE_KEYS)
    if bad:
        raise BuildError(f"--profile {p}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(PROFILE_KEYS))}")
    for key in sorted(d):
        problem = _field_problem(key, d[key])
        if problem:
            raise BuildError(f"--profile {p}: {key} {problem}; write it as {key} = {_EXAMPLE.get(key, '...')}")
    for key in PATH_KEYS:
        if key in d:
            v = os.path.expanduser(d[key])
            d[key] = v if os.path.isabs(v) else str((p.parent.resolve() / v).resolve())
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
    _release_rewriter_matches()
    if not Path(str(path) + ".data").is_file():
        raise BuildError(f"the exporter wrote no external data file beside {path}; this torch "
                         f"({torch.__version__}) is not supported for export: use torch>=2.6")


_MATCH_STATE = ("_graph", "_current_node", "_match", "_tracer")


def _release_rewriter_matches() -> None:
    """Drop what onnxscript's pattern matchers keep of their last match.

    The optimizer's rewrite rules are module-level objects, and each one's matcher keeps the
    last graph it matched (``_graph``, ``_match``, ...) until its next match. That graph holds
    the exported module's own parameters as initialiser values, so after an export the model
    outlived ``del`` and ``gc.collect()`` (at 8B, ~13 GiB kept on the GPU through the TensorRT
    build). A matcher sets these fields afresh at the start of every match, so clearing them
    between exports changes no later export."""
    import gc
    import sys

    mod = sys.modules.get("onnxscript.rewriter._matcher")
    base = getattr(mod, "PatternMatcher", None)
    if base is None:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if base in type(obj).__mro__:  # not isinstance: the ABC hook touches deprecated lazy attributes
            d = vars(obj)
            for name in _MATCH_STATE:
                if d.get(name) is not None:
                    d[name] = None
    gc.collect()


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


def compare(engine: np.ndarray, eager: np.ndarray, tie_rel: float = 0.0) -> dict[str, float]:
    """Per-output parity metrics (optimum-style): max abs, relative, cosine, top-1 agreement.

    ``top1`` is margin-aware: where the eager top-1/top-2 gap is within ``tie_rel * |top-1|``
    (a near-tie: logits rounded to bf16 tie exactly at a few percent of positions) the engine
    agrees if its pick is within that band of the eager maximum; everywhere else it must pick
    the eager argmax. ``top1_exact`` is plain argmax agreement, ``top1_near_ties`` counts the
    near-tie positions, ``positions`` all of them."""
    if engine.shape != eager.shape:
        raise ValidationError(f"the engine's output has shape {list(engine.shape)}, the eager model's "
                              f"{list(eager.shape)}: the exported graph is wrong, nothing was installed")
    a, b = engine.astype(np.float64), eager.astype(np.float64)
    err = float(np.abs(a - b).max())
    scale = float(np.abs(b).max()) or 1.0
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    top, pick = b.argmax(-1), a.argmax(-1)
    best = np.take_along_axis(b, top[..., None], -1)[..., 0]
    second = np.partition(b, -2, axis=-1)[..., -2] if b.shape[-1] > 1 else np.full(best.shape, -np.inf)
    band = tie_rel * np.abs(best)
    picked = np.take_along_axis(b, pick[..., None], -1)[..., 0]
    exact = pick == top
    agree = exact | (picked >= best - band)
    return {"max_abs_err": err, "rel_err": err / scale, "cosine": cos, "top1": float(agree.mean()),
            "top1_exact": float(exact.mean()), "top1_near_ties": int((best - second <= band).sum()),
            "positions": int(exact.size)}


def check_tolerance(metrics: dict[str, float], tol: Tolerance, precision: str, what: str) -> None:
    bad = []
    if not metrics["rel_err"] <= tol.rel_err:  # `not <=` also catches NaN
        bad.append(f"rel err {metrics['rel_err']:.3g} > {tol.rel_err:g}")
    if not metrics["top1"] >= tol.top1:
        ties = metrics.get("top1_near_ties")
        extra = f" with {ties} of {metrics['positions']} near-tie positions allowed either code" if ties else ""
        bad.append(f"top-1 agreement {metrics['top1']:.4f} < {tol.top1}{extra}")
    if not metrics["cosine"] >= tol.cosine:
        bad.append(f"cosine {metrics['cosine']:.6f} < {tol.cosine}")
    if bad:
        raise ValidationError(f"{what} does not match the eager model at {precision} ({'; '.join(bad)}; max abs err "
                              f"{metrics['max_abs_err']:.3g}): the exported graph is wrong, nothing was installed")


def _precision_knobs() -> list:
    """The backends whose fp32 matmul/conv may run in reduced precision (TF32; bf16 on CPU)."""
    return [b for b in (torch.backends.cuda.matmul, torch.backends.cudnn, getattr(torch.backends, "mkldnn", None))
            if b is not None and hasattr(b, "fp32_precision")]


@contextlib.contextmanager
def _fp32_math(precision: str):
    """fp32 references computed in fp32: no TF32 in cuBLAS or cuDNN (cuDNN's TF32 default is
    on, and a caller may have turned cuBLAS's on). torch >= 2.9 has ``fp32_precision``
    ("ieee"), and refuses a mix of it with the legacy flags once a caller has used it, so the
    new API is used where it exists and ``allow_tf32`` only on older torch. Restored after."""
    if precision != "fp32":
        yield
        return
    knobs = _precision_knobs()
    if knobs:
        saved = [b.fp32_precision for b in knobs]
        for b in knobs:
            b.fp32_precision = "ieee"
        try:
            yield
        finally:
            for b, v in zip(knobs, saved):
                b.fp32_precision = v
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def eager_references(graph: EngineGraph, inputs, precision: str) -> list[np.ndarray]:
    """The eager model's logits for the validation inputs, on the host: computed before the
    export so the model can be freed before any engine is built or loaded."""
    dev = graph.head.device
    out = []
    with _fp32_math(precision), torch.inference_mode():
        for ids, mask in inputs:
            out.append(graph(ids.to(dev), mask.to(dev)).float().cpu().numpy())
    return out


_WORSE = {"max_abs_err": max, "rel_err": max, "cosine": min, "top1": min, "top1_exact": min}


def validate_with(run: Callable[[torch.Tensor, torch.Tensor], np.ndarray], inputs, references: list[np.ndarray],
                  precision: str, what: str) -> dict[str, float]:
    """Worst case over the validation inputs against the stored eager ``references``;
    raises ValidationError past the tolerance."""
    tol = TOLERANCES[precision]
    worst: dict[str, float] = {}
    for (ids, mask), ref in zip(inputs, references, strict=True):
        m = compare(run(ids, mask), ref, tol.tie_rel)
        for k, v in m.items():
            if k not in worst:
                worst[k] = v
            elif k in _WORSE:
                worst[k] = v if np.isnan(v) or np.isnan(worst[k]) else _WORSE[k](worst[k], v)
            else:  # counts add up
                worst[k] += v
    check_tolerance(worst, tol, precision, what)
    return worst


def ort_runner(path: Path, device: torch.device, precision: str = "fp32") -> Callable:
    from .engines.ort import open_session, providers_for

    try:
        providers = providers_for(device, tf32=False if precision == "fp32" else None)
    except EngineError:  # torch on CUDA, onnxruntime CPU-only: validate the same graph on the CPU
        providers = ["CPUExecutionProvider"]
    sess = open_session(path, providers)

    def run(ids, mask):
        return sess.run(None, {"input_ids": ids.numpy(), "key_mask": mask.numpy()})[0]

    return run


# ------------------------------------------------------------------ the build

# What each backend imports during a build, by the extra that installs it. Checked before the
# checkpoint is hashed or loaded: on an 8B model that work takes minutes, and a missing exporter
# found after it is a traceback from deep inside torch.onnx.
def needed_extras(backend: str, validate: bool = True) -> list[tuple[str, list[str]]]:
    if backend == "onnx":  # export (onnx, onnxscript) and the engine's own runtime
        return [("onnx", ["onnx", "onnxscript", "onnxruntime"])]
    if backend == "tensorrt":  # export, then the plan; onnxruntime only validates the ONNX graph first
        return [("gpu", ["onnx", "onnxscript"] + (["onnxruntime"] if validate else [])), ("tensorrt", ["tensorrt"])]
    return []


def require_extras(backend: str, validate: bool = True, find_spec: Callable[[str], Any] | None = None) -> None:
    """One BuildError naming every missing module and the pip install that brings it."""
    import importlib.util

    find_spec = find_spec or importlib.util.find_spec

    def present(m: str) -> bool:
        try:
            return find_spec(m) is not None
        except ValueError:  # imported, without a __spec__ (a stand-in module set into sys.modules)
            return sys.modules.get(m) is not None

    missing, extras = [], []
    for extra, modules in needed_extras(backend, validate):
        gone = [m for m in modules if not present(m)]
        if gone:
            missing += gone
            extras.append(extra)
    if missing:
        names = ",".join(extras)
        raise BuildError(f"--backend {backend} needs {', '.join(missing)}, not installed in this Python: "
                         f"pip install 'ladr-rt[{names}]' (in a source checkout: pip install -e '.[{names}]')")


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "tensorrt", "ladr-rt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def _build_lock(out_dir: Path, name: str):
    """Exclusive, non-blocking flock on ``out_dir/.NAME.lock`` for one build of NAME.

    The kernel drops the lock when its holder dies (even by SIGKILL), so a leftover file never
    blocks a later build. The file is removed at the end while still locked; a build that
    locked the old file just before that sees it is no longer the one at the path and retries,
    so two builds can never both hold "the" lock."""
    import fcntl

    path = out_dir / f".{name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise BuildError(f"--out {out_dir / name}: cannot create the build lock {path} ({e.strerror}); is "
                             f"{out_dir} writable?") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise BuildError(f"another build of {out_dir / name} is running{f' (pid {holder})' if holder else ''}; "
                             f"wait for it to finish or build to another --out (lock: {path})") from None
        except OSError as e:
            os.close(fd)
            raise BuildError(f"cannot lock {path} ({e.strerror}); build to a directory on a local file "
                             "system") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_stale(out_dir: Path, name: str, log: Callable[[str], None]) -> None:
    """Temp directories and manifest temp files of earlier builds of NAME that were killed
    outright. Called with the lock held, so none of them belongs to a live build; the names
    are matched exactly (``.NAME.build-`` + mkdtemp's 8 characters) so another engine's
    files are never touched."""
    tmp_dir = re.compile(rf"\.{re.escape(name)}\.build-[a-z0-9_]{{8}}")
    tmp_manifest = re.compile(rf"\.{re.escape(name)}\.json\.[a-z0-9_]{{8}}\.json")
    for p in out_dir.iterdir():
        if tmp_dir.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            log(f"[build] removed {p}, left by an interrupted build")
        elif tmp_manifest.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


def _build_device(opts: BuildOptions, device: str | None) -> torch.device:
    if opts.backend == "tensorrt":
        from .engines.trt import import_trt

        import_trt()  # fail before the export, not after it
        if not torch.cuda.is_available():
            raise BuildError("--backend tensorrt needs a CUDA GPU (TensorRT builds for the GPU it runs on); use "
                             "--backend onnx on this machine")
        dev = torch.device(device or "cuda")
        if dev.type != "cuda":
            raise BuildError(f"--backend tensorrt builds on a CUDA device, not --device {device}")
        return dev
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if opts.backend == "inductor":
        from .engines.inductor import check_toolchain

        if dev.type == "cuda" and not torch.cuda.is_available():
            raise BuildError("--backend inductor --device cuda: torch sees no CUDA device; build with --device cpu")
        check_toolchain(dev)  # before the model loads: a missing compiler would fail only after the export
    return dev


def _gpu_info(dev: torch.device) -> dict[str, str]:
    from .engines.trt import compute_capability

    return {"name": torch.cuda.get_device_name(dev), "compute_capability": compute_capability(dev)}


def _timing_cache_path(opts: BuildOptions) -> Path | None:
    """The timing cache as an absolute path (a relative one from the command line or the Python
    API is relative to the working directory; from a profile it was already made relative to
    the profile), its directory created now: not after a 20-minute TensorRT build."""
    if opts.backend != "tensorrt" or not opts.timing_cache:
        return None
    p = Path(os.path.expanduser(opts.timing_cache)).absolute()
    if p.is_dir():
        raise BuildError(f"timing_cache {p} is a directory; name a file, e.g. {p / 'timing.cache'}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"timing_cache {p}: cannot create its directory {p.parent} ({e.strerror}); fix the path "
                         "(in the profile, relative to the profile file)") from None
    return p


def _release(dev: torch.device) -> None:
    """Give back the memory of objects just dropped (the 16 GB model before TensorRT builds)."""
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _sha256(path: Path) -> tuple[str, os.stat_result]:
    import hashlib

    with path.open("rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return sha, path.stat()


def _build_inductor(graph: EngineGraph, path: Path, rows: int, L: int, N: int, K: int, opts: BuildOptions,
                    io: dict[str, Any], t0: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Export + AOTInductor compile into ``path``; returns the manifest's ``target``. The
    package carries its own copy of what the manifest says about it (``check_package``)."""
    from .engines.inductor import compile_package, target_of

    dev = graph.head.device
    target = target_of(dev)
    meta = {"name": path.stem, "device": dev.type, "torch": torch.__version__, "precision": opts.precision,
            "io": json.dumps(io, sort_keys=True)}
    compile_package(graph, path, rows, L, meta)
    target["compile_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"[compile] {path.name}: {rows}x{L} tokens -> {rows}x{N}x{K} logits, {opts.precision}, {dev.type} "
        f"({target.get('cpu_capability') or 'cuda'}, torch {torch.__version__}), "
        f"{path.stat().st_size / 2**20:.1f} MiB, {target['compile_seconds']:.1f} s")
    return target


def _validate_inductor(path: Path, dev: torch.device, inputs, refs, opts: BuildOptions,
                       log: Callable[[str], None]) -> dict[str, float]:
    from .engines.inductor import package_runner

    t0 = time.perf_counter()
    run = package_runner(path, dev)
    with _fp32_math(opts.precision):
        m = validate_with(run, inputs, refs, opts.precision, f"the AOTInductor package ({dev.type})")
    del run
    _release(dev)
    log(f"[validate] inductor vs eager ({len(inputs)} inputs): max abs {m['max_abs_err']:.3g}, rel "
        f"{m['rel_err']:.3g}, cosine {m['cosine']:.6f}, top-1 {m['top1']:.4f} ({m['top1_near_ties']} of "
        f"{m['positions']} positions near-ties), {time.perf_counter() - t0:.1f} s")
    return m


def build(opts: BuildOptions, log: Callable[[str], None] = print, device: str | None = None) -> Path:
    """Build the engine ``opts.out`` and return its manifest path."""
    from .checkpoint import DTYPES, checkpoint_digest, load_model, load_tokenizer, read_config, remember_sha256
    from .tokens import SequenceLayout

    opts = opts.validated()
    require_extras(opts.backend, opts.validate)
    out_dir, name = engine_paths(opts.out)
    if not out_dir.is_dir():
        raise BuildError(f"--out {opts.out}: directory {out_dir} does not exist; create it first")
    dev = _build_device(opts, device)
    cache_path = _timing_cache_path(opts)
    cfg = read_config(opts.model)
    spec = ImageSpec(opts.height, opts.width, opts.prompt_budget)
    spec.validate(cfg.layout.vq_scale)
    seq = SequenceLayout(spec, cfg.layout)
    rows, L, N, K = 2 * opts.batch, seq.seq_len, seq.n_image, cfg.layout.codebook
    tokenizer = load_tokenizer(opts.model)
    inputs = validation_inputs(tokenizer, seq, opts.batch)  # also checks the templates fit the budget
    keep_onnx = opts.keeps_onnx

    with signals_unwind(BuildInterrupted), _build_lock(out_dir, name):
        _remove_stale(out_dir, name, log)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=out_dir))
            t0 = time.perf_counter()
            weights_digest = checkpoint_digest(opts.model)  # whole-content sha256 (cached per user)
            model = load_model(opts.model, dtype=DTYPES[opts.precision], device=dev)
            graph = EngineGraph.from_model(model, L, seq.image_positions)
            # References first, on the host: then model and graph are freed before onnxruntime
            # or TensorRT allocate anything (an 8B model is 16 GB of GPU memory).
            refs = eager_references(graph, inputs, opts.precision) if opts.validate else None
            io = {"inputs": [{"name": "input_ids", "shape": [rows, L], "dtype": "int32"},
                             {"name": "key_mask", "shape": [rows, L], "dtype": "bool"}],
                  "outputs": [{"name": "logits", "shape": [rows, N, K], "dtype": "float32"}]}
            validation: dict[str, Any] = {"tolerance": dataclasses.asdict(TOLERANCES[opts.precision]),
                                          "inputs": len(inputs), "prompts": list(VALIDATION_PROMPTS)}
            target = None
            if opts.backend == "inductor":
                target = _build_inductor(graph, tmp / f"{name}.pt2", rows, L, N, K, opts, io, t0, log)
                del graph, model
                _release(dev)
                if opts.validate:
                    validation["inductor"] = _validate_inductor(tmp / f"{name}.pt2", dev, inputs, refs, opts, log)
            else:
                onnx_tmp = tmp / f"{name}.onnx"  # final name inside the temp dir: the .onnx refers to NAME.onnx.data
                export_onnx(graph, onnx_tmp, rows, L, opts.opset)
                del graph, model
                _release(dev)
                check_onnx_file(onnx_tmp)
                size = onnx_tmp.stat().st_size + Path(str(onnx_tmp) + ".data").stat().st_size
                log(f"[export] {onnx_tmp.name}: {rows}x{L} tokens -> {rows}x{N}x{K} logits, {opts.precision}, "
                    f"{size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")

            if opts.validate and opts.backend != "inductor":
                t0 = time.perf_counter()
                try:
                    run = ort_runner(onnx_tmp, dev, opts.precision)
                    validation["onnxruntime"] = validate_with(run, inputs, refs, opts.precision,
                                                              f"the ONNX graph (onnxruntime, {dev.type})")
                    del run
                except EngineError as e:
                    if "NOT_IMPLEMENTED" not in str(e) or opts.backend != "tensorrt":
                        if "NOT_IMPLEMENTED" in str(e):
                            raise BuildError(f"onnxruntime on {dev.type} has no {opts.precision} kernels for this "
                                             f"graph, so an onnx engine could not run here; use --precision fp32 or "
                                             f"fp16, or --backend tensorrt on a GPU") from None
                        raise
                    validation["onnxruntime"] = f"skipped: onnxruntime on {dev.type} has no {opts.precision} kernels"
                _release(dev)
                m = validation.get("onnxruntime")
                if isinstance(m, dict):
                    log(f"[validate] onnxruntime vs eager ({len(inputs)} inputs): max abs {m['max_abs_err']:.3g}, "
                        f"rel {m['rel_err']:.3g}, cosine {m['cosine']:.6f}, top-1 {m['top1']:.4f} "
                        f"({m['top1_near_ties']} of {m['positions']} positions near-ties), "
                        f"{time.perf_counter() - t0:.1f} s")

            gpu = _gpu_info(dev) if opts.backend == "inductor" and dev.type == "cuda" else None
            if opts.backend == "tensorrt":
                from .engines.trt import build_plan, plan_runner

                t0 = time.perf_counter()
                build_plan(onnx_tmp, tmp / f"{name}.plan", opts.precision, opts.workspace_gib, cache_path, log=log)
                gpu = _gpu_info(dev)
                log(f"[build] {name}.plan ({gpu['name']}, sm {gpu['compute_capability']}), "
                    f"{time.perf_counter() - t0:.1f} s")
                if opts.validate:
                    run = plan_runner(tmp / f"{name}.plan", rows, L, N, K, dev)
                    validation["tensorrt"] = validate_with(run, inputs, refs, opts.precision, "the TensorRT engine")
                    del run
                    _release(dev)
            files = engine_files(name, opts.backend, keep_onnx)
            for f in (f"{name}.onnx", f"{name}.onnx.data"):
                if f not in files:  # a TensorRT build without --keep-onnx: the plan is the engine
                    (tmp / f).unlink(missing_ok=True)
            hashed = {f: _sha256(tmp / f) for f in files}

            build_args = {"model": str(opts.model), "height": opts.height, "width": opts.width,
                          "prompt_budget": opts.prompt_budget, "batch": opts.batch, "precision": opts.precision,
                          "backend": opts.backend, "out": str(out_dir / name), "keep_onnx": keep_onnx}
            if target is not None:
                build_args["device"] = dev.type
            manifest = {
                "format": FORMAT, "name": name, "backend": opts.backend, "precision": opts.precision,
                "runner": RUNNERS[opts.backend],
                "build_args": build_args,
                "model": {"dir": str(Path(opts.model).resolve()), "config_digest": cfg.digest(),
                          "weights_digest": weights_digest, "config": cfg.to_json_dict()},
                "grid": list(seq.grid), "seq_len": L, "n_image": N, "image_start": seq.image_start,
                "layout": dataclasses.asdict(cfg.layout), "io": io,
                "files": {f: {"size": st.st_size, "sha256": sha} for f, (sha, st) in hashed.items()},
                "versions": _versions(), "gpu": gpu, "validation": validation,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if target is not None:
                manifest["target"] = target
            # Install: drop the old manifest first so no moment pairs it with new files, move
            # the files, write the manifest last. Files of the old engine this one does not
            # have (an ONNX graph a plan-only build does not keep) go too: the manifest lists
            # exactly the files that exist.
            (out_dir / f"{name}.json").unlink(missing_ok=True)
            for stale in (f"{name}.onnx", f"{name}.onnx.data", f"{name}.plan", f"{name}.pt2"):
                if stale not in files:
                    (out_dir / stale).unlink(missing_ok=True)
            for f in files:
                os.replace(tmp / f, out_dir / f)
            write_manifest(out_dir / f"{name}.json", manifest)
            for f, (sha, st) in hashed.items():  # the first run after the build need not re-read them
                remember_sha256(out_dir / f, sha, st)
            log(f"[manifest] {out_dir / name}.json")
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / f"{name}.json"
