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

FORMAT = 1
BACKENDS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")


class EngineError(ValueError):
    """An engine that cannot be used as it is; the message names the fix."""


class EngineMismatch(EngineError):
    pass


def engine_paths(out: str | os.PathLike) -> tuple[Path, str]:
    """``engines/NAME`` (suffix optional) -> (directory, NAME)."""
    p = Path(out)
    name = p.name
    for suffix in (".json", ".onnx", ".plan"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if not name or name.startswith("."):
        raise EngineError(f"engine name {str(out)!r} is empty or hidden; use --out engines/NAME")
    return p.parent if str(p.parent) else Path("."), name


def manifest_path(engine: str | os.PathLike) -> Path:
    d, name = engine_paths(engine)
    return d / f"{name}.json"


def build_command(m: dict[str, Any], **override: Any) -> str:
    """The ``ladr-rt build`` line that makes this engine, with ``override`` applied."""
    a = dict(m["build_args"])
    if "_dir" in m:  # the engine may have moved since it was built: rebuild where it is now
        a["out"] = str(Path(m["_dir"]) / m["name"])
    a.update({k: v for k, v in override.items() if v is not None})
    parts = ["ladr-rt", "build", "--model", str(a["model"]), "--height", str(a["height"]), "--width",
             str(a["width"]), "--prompt-budget", str(a["prompt_budget"]), "--batch", str(a["batch"]),
             "--precision", a["precision"], "--backend", a["backend"], "--out", str(a["out"])]
    return " ".join(shlex.quote(x) for x in parts)


def write_manifest(path: Path, m: dict[str, Any]) -> None:
    """Temp file then rename: a reader sees the whole manifest or none."""
    atomic_write_text(path, json.dumps(m, indent=1, sort_keys=True) + "\n")


def read_manifest(engine: str | os.PathLike) -> dict[str, Any]:
    path = manifest_path(engine)
    d, name = engine_paths(engine)
    if not path.is_file():
        raise EngineError(f"no engine manifest {path} (a build writes it last, so the build of {name!r} never "
                          f"finished); build it with `ladr-rt build --model DIR --out {d / name} ...`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); rebuild the engine "
                          f"with `ladr-rt build ... --out {d / name}`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path} is not a ladr-rt engine manifest of format {FORMAT}; rebuild it with "
                          f"`ladr-rt build ... --out {d / name}`")
    m["_dir"] = str(d)
    return m


def check_files(m: dict[str, Any]) -> None:
    """Every engine file present at the size the build recorded (catches truncation cheaply)."""
    d = Path(m["_dir"])
    for rel, size in m["files"].items():
        f = d / rel
        if not f.is_file():
            raise EngineError(f"engine file {f} is missing; rebuild: `{build_command(m)}`")
        got = f.stat().st_size
        if got != size:
            raise EngineError(f"engine file {f} is {got} bytes, the build wrote {size} (truncated or replaced); "
                              f"rebuild: `{build_command(m)}`")


def check_manifest(m: dict[str, Any], *, config_digest: str | None = None, weights_digest: str | None = None,
                   height: int | None = None, width: int | None = None, prompt_budget: int | None = None,
                   batch: int | None = None, compute_capability: str | None = None) -> None:
    """Refuse a run the engine was not built for. ``None`` means: take the engine's value."""
    wanted = {"height": height, "width": width, "prompt_budget": prompt_budget, "batch": batch}
    diffs, override = [], {}
    for key, want in wanted.items():
        have = m["build_args"][key]
        if want is not None and want != have:
            diffs.append(f"{key.replace('_', '-')} {have} (this run: {want})")
            override[key] = want
    if config_digest is not None and config_digest != m["model"]["config_digest"]:
        diffs.append("the model's config.json differs from the one it was built from")
    if weights_digest is not None and weights_digest != m["model"]["weights_digest"]:
        diffs.append("the model's weights differ from the ones it was built from")
    built_cc = (m.get("gpu") or {}).get("compute_capability")
    if built_cc and compute_capability is not None and compute_capability != built_cc:
        diffs.append(f"GPU compute capability {built_cc} (this GPU: {compute_capability})")
    if diffs:
        name = Path(m["_dir"]) / m["name"]
        raise EngineMismatch(f"engine {name} was built for {'; '.join(diffs)}; rebuild: "
                             f"`{build_command(m, **override)}`")
