"""The engine manifest: what an engine was built from and for, and the check a run makes.

``engines/NAME.json`` is written last by ``ladr-rt build`` (so its presence means the build
finished) and read first by ``generate --engine``. A run that asks for something the
engine was not built for is refused with one line naming what differs and the ``build``
command that would make a matching engine.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text

# 2: every engine file carries a content digest (files: {name: {size, sha256}}) and
# build_args records keep_onnx; a format-1 manifest is refused with "rebuild".
# 3: the inductor backend (an AOTInductor .pt2 package) and its "target" (torch version,
# device, CPU ISA or compute capability the package was compiled for). A format-2 manifest
# (onnx or tensorrt only) describes the same engine as it did, so it is still read.
FORMAT = 3
READABLE_FORMATS = (2, 3)
BACKENDS = ("onnx", "tensorrt", "inductor")
PRECISIONS = ("fp32", "fp16", "bf16")
RUNNERS = {"onnx": "onnxruntime", "tensorrt": "tensorrt", "inductor": "aoti"}
INDUCTOR_DEVICES = ("cpu", "cuda")


class EngineError(ValueError):
    """An engine that cannot be used as it is; the message names the fix."""


class EngineMismatch(EngineError):
    pass


class BuildError(EngineError):
    """A build that cannot go on (``ladr-rt build``, ``engines.trt.build_plan``)."""


def engine_paths(out: str | os.PathLike) -> tuple[Path, str]:
    """``engines/NAME`` (suffix optional) -> (directory, NAME)."""
    p = Path(out)
    name = p.name
    for suffix in (".json", ".onnx", ".plan", ".pt2"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if not name or name.startswith("."):
        raise EngineError(f"engine name {str(out)!r} is empty or hidden; use --out engines/NAME")
    return p.parent if str(p.parent) else Path("."), name


def manifest_path(engine: str | os.PathLike) -> Path:
    d, name = engine_paths(engine)
    return d / f"{name}.json"


def engine_files(name: str, backend: str, keep_onnx: bool) -> list[str]:
    """The files an engine consists of: the ONNX graph for onnxruntime, the plan for TensorRT
    (plus the ONNX graph it was parsed from, when kept), the .pt2 package for inductor (its
    weights are inside it)."""
    if backend == "inductor":
        return [f"{name}.pt2"]
    onnx = [f"{name}.onnx", f"{name}.onnx.data"]
    if backend == "onnx":
        return onnx
    return (onnx if keep_onnx else []) + [f"{name}.plan"]


def build_command(m: dict[str, Any], **override: Any) -> str:
    """The ``ladr-rt build`` line that makes this engine, with ``override`` applied."""
    a = dict(m["build_args"])
    if "_dir" in m:  # the engine may have moved since it was built: rebuild where it is now
        a["out"] = str(Path(m["_dir"]) / m["name"])
    a.update({k: v for k, v in override.items() if v is not None})
    parts = ["ladr-rt", "build", "--model", str(a["model"]), "--height", str(a["height"]), "--width",
             str(a["width"]), "--prompt-budget", str(a["prompt_budget"]), "--batch", str(a["batch"]),
             "--precision", str(a["precision"]), "--backend", str(a["backend"]), "--out", str(a["out"])]
    if a.get("backend") == "tensorrt" and a.get("keep_onnx") is True:
        parts.append("--keep-onnx")
    if a.get("backend") == "inductor" and a.get("device"):  # a package runs on the device kind it was compiled for
        parts += ["--device", str(a["device"])]
    return " ".join(shlex.quote(x) for x in parts)


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    """Temp file then rename: a reader sees the whole manifest or none."""
    atomic_write_text(path, json.dumps(m, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------ reading and checking

class _Bad(Exception):
    pass


_KIND = {int: "an integer", str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def _show(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else type(v).__name__
    kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null",
            dict: "an object", list: "a list"}.get(type(v), type(v).__name__)
    return f"{text[:40]} ({kind})" if isinstance(v, (str, int, float, bool)) else kind


def _get(m: dict[str, Any], dotted: str, kind: type, *, positive: bool = False, choices=None) -> Any:
    cur: Any = m
    seen = []
    for k in dotted.split("."):
        seen.append(k)
        if not isinstance(cur, dict):
            raise _Bad(f"field '{'.'.join(seen[:-1])}' is {_show(cur)}, expected an object")
        if k not in cur:
            raise _Bad(f"field '{'.'.join(seen)}' is missing")
        cur = cur[k]
    ok = type(cur) is kind if kind in (int, bool) else isinstance(cur, kind)
    if not ok:
        raise _Bad(f"field '{dotted}' is {_show(cur)}, expected {_KIND[kind]}")
    if positive and cur <= 0:
        raise _Bad(f"field '{dotted}' is {cur}, expected a positive integer")
    if choices is not None and cur not in choices:
        raise _Bad(f"field '{dotted}' is {_show(cur)}, expected one of {', '.join(map(str, choices))}")
    return cur


def _expected_io(rows: int, seq_len: int, n_image: int, codebook: int) -> dict[str, Any]:
    return {"inputs": [{"name": "input_ids", "shape": [rows, seq_len], "dtype": "int32"},
                       {"name": "key_mask", "shape": [rows, seq_len], "dtype": "bool"}],
            "outputs": [{"name": "logits", "shape": [rows, n_image, codebook], "dtype": "float32"}]}


def _io_text(io: dict[str, tuple[list, str]]) -> str:
    return ", ".join(f"{n} {list(s)} {t}" for n, (s, t) in sorted(io.items()))


def _check_structure(m: dict[str, Any], name: str) -> None:
    """Every field a run reads, with its type, and the shape fields consistent with each
    other; raises _Bad naming the first field that is wrong."""
    from ..config import ImageSpec, TokenLayout
    from ..tokens import SequenceLayout

    if _get(m, "name", str) != name:
        raise _Bad(f"field 'name' is {_show(m['name'])}, but the manifest file is {name}.json (an engine cannot "
                   f"be renamed: {m['name']}.onnx refers to {m['name']}.onnx.data by name)")
    backend = _get(m, "backend", str, choices=BACKENDS)
    precision = _get(m, "precision", str, choices=PRECISIONS)
    _get(m, "runner", str, choices=(RUNNERS[backend],))
    for k in ("model", "out"):
        _get(m, f"build_args.{k}", str)
    h, w, pb, batch = (_get(m, f"build_args.{k}", int, positive=True)
                       for k in ("height", "width", "prompt_budget", "batch"))
    _get(m, "build_args.precision", str, choices=(precision,))
    _get(m, "build_args.backend", str, choices=(backend,))
    keep_onnx = _get(m, "build_args.keep_onnx", bool)
    for k in ("dir", "config_digest", "weights_digest"):
        _get(m, f"model.{k}", str)
    try:
        lay = TokenLayout.from_dict(_get(m, "layout", dict), where="layout")
        seq = SequenceLayout(ImageSpec(h, w, pb), lay)
        seq.spec.validate(lay.vq_scale)
    except ValueError as e:
        raise _Bad(f"fields 'layout'/'build_args' do not describe an engine shape ({e})") from None
    derived = {"grid": list(seq.grid), "seq_len": seq.seq_len, "n_image": seq.n_image, "image_start": seq.image_start}
    for k, v in derived.items():
        if m.get(k) != v or type(m.get(k)) is bool:
            raise _Bad(f"field '{k}' is {_show(m.get(k)) if k in m else 'missing'}, but build_args (height {h}, "
                       f"width {w}, prompt budget {pb}) give {v}")
    if m.get("io") != _expected_io(2 * batch, seq.seq_len, seq.n_image, lay.codebook):
        want = _expected_io(2 * batch, seq.seq_len, seq.n_image, lay.codebook)
        raise _Bad(f"field 'io' does not describe this engine's shape (expected "
                   f"{_io_text({t['name']: (t['shape'], t['dtype']) for t in want['inputs'] + want['outputs']})})")
    files = _get(m, "files", dict)
    expected = engine_files(name, backend, keep_onnx)
    if sorted(files) != sorted(expected):
        raise _Bad(f"field 'files' lists {', '.join(sorted(files)) or 'nothing'}, expected {', '.join(expected)}")
    for f in expected:
        e = files[f]
        if not isinstance(e, dict):
            raise _Bad(f"field 'files' entry {f!r} is {_show(e)}, expected an object with size and sha256")
        if type(e.get("size")) is not int or e["size"] < 0:
            raise _Bad(f"field 'files' entry {f!r} has size {_show(e.get('size'))}, expected a byte count")
        sha = e.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise _Bad(f"field 'files' entry {f!r} has sha256 {_show(sha)}, expected 64 hex digits")
    gpu = m.get("gpu")
    if backend == "inductor":
        if m["format"] < 3:
            raise _Bad("backend 'inductor' needs manifest format 3")
        dev = _get(m, "target.device", str, choices=INDUCTOR_DEVICES)
        _get(m, "build_args.device", str, choices=(dev,))
        _get(m, "target.torch", str)
        if dev == "cpu":
            _get(m, "target.cpu_capability", str)
        elif gpu is None:
            raise _Bad("field 'gpu' is missing, but a CUDA package is compiled for one GPU architecture")
    if backend == "tensorrt" or gpu is not None:
        cc = _get(m, "gpu.compute_capability", str)
        if not all(p.isdigit() for p in cc.split(".")) or cc.count(".") != 1:
            raise _Bad(f"field 'gpu.compute_capability' is {_show(cc)}, expected MAJOR.MINOR such as 9.0")


def _rebuild(m: Any, d: Path, name: str) -> str:
    """The build line for a rebuild: the recorded one when build_args are usable, else a template."""
    try:
        if isinstance(m, dict) and isinstance(m.get("build_args"), dict):
            return build_command({**m, "_dir": str(d), "name": name})
    except (KeyError, TypeError):
        pass
    return f"ladr-rt build --model DIR --out {shlex.quote(str(d / name))} ..."


def read_manifest(engine: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``engines/NAME``, structurally checked: a hand-edited or damaged one is
    refused with one line naming the file, the field and the rebuild."""
    path = manifest_path(engine)
    d, name = engine_paths(engine)
    if not path.is_file():
        raise EngineError(f"no engine manifest {path} (a build writes it last, so the build of {name!r} never "
                          f"finished); build it with `ladr-rt build --model DIR --out {d / name} ...`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); rebuild the engine "
                          f"with `ladr-rt build ... --out {d / name}`") from None
    except OSError as e:
        raise EngineError(f"{path} cannot be read ({e.strerror or e}); fix its permissions or rebuild the engine "
                          f"with `ladr-rt build ... --out {d / name}`") from None
    if not isinstance(m, dict) or "format" not in m:
        raise EngineError(f"{path} is not a ladr-rt engine manifest; rebuild the engine with "
                          f"`ladr-rt build ... --out {d / name}`")
    fmt = m["format"]
    if fmt not in READABLE_FORMATS or type(fmt) is not int:
        why = (f"was written by an older ladr-rt (manifest format {fmt}, this ladr-rt reads formats "
               f"{READABLE_FORMATS[0]}-{FORMAT}, which record a content digest of every engine file)"
               if type(fmt) is int and fmt < FORMAT else
               f"has manifest format {_show(fmt)}, this ladr-rt reads formats {READABLE_FORMATS[0]}-{FORMAT}")
        raise EngineError(f"{path} {why}; rebuild the engine: `{_rebuild(m, d, name)}`")
    try:
        _check_structure(m, name)
    except _Bad as e:
        raise EngineError(f"{path}: {e}; the manifest was edited or damaged: rebuild the engine: "
                          f"`{_rebuild(m, d, name)}`") from None
    m["_dir"] = str(d)
    return m


def check_files(m: dict[str, Any]) -> None:
    """Every engine file present, at the size the build recorded (truncation, cheaply, first)
    and with the content it recorded (sha256, cached per user while the file's stat is
    unchanged: see ``checkpoint.file_sha256s``)."""
    from ..checkpoint import file_sha256s

    d = Path(m["_dir"])
    paths = {rel: d / rel for rel in m["files"]}
    for rel, f in paths.items():
        if not f.is_file():
            raise EngineError(f"engine file {f} is missing; rebuild: `{build_command(m)}`")
        got, size = f.stat().st_size, m["files"][rel]["size"]
        if got != size:
            raise EngineError(f"engine file {f} is {got} bytes, the build wrote {size} (truncated or replaced); "
                              f"rebuild: `{build_command(m)}`")
    try:
        sums = file_sha256s(list(paths.values()))
    except OSError as e:
        raise EngineError(f"engine file {e.filename or d} cannot be read ({e.strerror or e}); fix its permissions "
                          f"or rebuild: `{build_command(m)}`") from None
    for rel, f in paths.items():
        if sums[f] != m["files"][rel]["sha256"]:
            raise EngineError(f"engine file {f} does not hold what the build wrote (same size, other content: "
                              f"overwritten or corrupted in place); rebuild: `{build_command(m)}`")


def check_io(m: dict[str, Any], got: dict[str, tuple[list, str]], source: Path) -> None:
    """The loaded graph's I/O names, shapes and dtypes against the manifest's: the pipeline
    sizes its buffers from the manifest, so a disagreement must stop the run here."""
    want = {t["name"]: (list(t["shape"]), t["dtype"]) for t in m["io"]["inputs"] + m["io"]["outputs"]}
    got = {n: (list(s), t) for n, (s, t) in got.items()}
    if got != want:
        raise EngineError(f"{source} has I/O {_io_text(got)}, but its manifest says {_io_text(want)} (the manifest "
                          f"was edited or belongs to another build); rebuild: `{build_command(m)}`")


def _unbuildable(m: dict[str, Any], override: dict[str, Any]) -> str | None:
    """Why ``ladr-rt build`` would refuse the requested shape, or None when it would build it."""
    from ..config import ImageSpec

    # The checks BuildOptions.validated() makes of a shape (precision and backend stay the
    # engine's own), without importing the build layer into the manifest.
    a = {**m["build_args"], **override}
    try:
        if isinstance(a["batch"], bool) or not isinstance(a["batch"], int) or a["batch"] < 1:
            raise ValueError(f"--batch must be >= 1, got {a['batch']}")
        vq = (m.get("layout") or {}).get("vq_scale", 16)
        ImageSpec(a["height"], a["width"], a["prompt_budget"]).validate(vq)
    except ValueError as e:
        return str(e)
    return None


def check_manifest(m: dict[str, Any], *, config_digest: str | None = None, weights_digest: str | None = None,
                   height: int | None = None, width: int | None = None, prompt_budget: int | None = None,
                   batch: int | None = None, compute_capability: str | None = None,
                   model: str | None = None) -> None:
    """Refuse a run the engine was not built for. ``None`` means: take the engine's value.
    ``model``: the model directory this run uses, named in the suggested rebuild line."""
    wanted = {"height": height, "width": width, "prompt_budget": prompt_budget, "batch": batch}
    diffs, override = [], ({"model": str(model)} if model is not None else {})
    for key, want in wanted.items():
        have = m["build_args"][key]
        if want is not None and want != have:
            diffs.append(f"it was built for {key.replace('_', ' ')} {have}, this run asks for {want}")
            override[key] = want
    if config_digest is not None and config_digest != m["model"]["config_digest"]:
        diffs.append("the model's config.json is not the one it was built from")
    if weights_digest is not None and weights_digest != m["model"]["weights_digest"]:
        diffs.append("the model's weights are not the ones it was built from")
    built_cc = (m.get("gpu") or {}).get("compute_capability")
    if built_cc and compute_capability is not None and compute_capability != built_cc:
        diffs.append(f"it was built for GPUs of compute capability {built_cc}, this GPU has {compute_capability}")
    if not diffs:
        return
    name = Path(m["_dir"]) / m["name"]
    why = _unbuildable(m, override) if set(override) - {"model"} else None
    if why:
        raise EngineMismatch(f"engine {name} does not fit this run: {'; '.join(diffs)}; no engine can be built for "
                             f"that either: {why}")
    raise EngineMismatch(f"engine {name} does not fit this run: {'; '.join(diffs)}; build one that does: "
                         f"`{build_command(m, **override)}`")
