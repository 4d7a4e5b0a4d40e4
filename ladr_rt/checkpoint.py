"""Hugging Face checkpoint directory <-> (config, weights, tokenizer, VQ decoder).

Layout, as published for Alpha-VLLM/Lumina-DiMOO:
    config.json, model.safetensors.index.json + model-0000k-of-0000n.safetensors
    (or one model.safetensors), tokenizer files, vqvae/ (diffusers VQModel).
Only safetensors are read: pickle files (.bin/.pt/.pth/.ckpt) can run code on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# "fp8" is not a compute dtype: it selects ladr_rt.fp8 (e4m3 trunk linears, the rest in bf16 on
# CUDA / fp32 on the CPU), which load_model recognises by this torch dtype.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def resolve_dtype(dtype, device) -> torch.dtype:
    """The eager model's precision, for the CLI and the Python API alike. ``None``/``"auto"``:
    bf16 on CUDA (an 8B model in fp32 is 32 GB, and DiMOO is published in bf16), fp32 on the
    CPU (whose bf16 matmuls are slow or emulated); a name from DTYPES or a torch dtype: that."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be 'auto', one of {', '.join(DTYPES)} or the matching torch dtype, got {dtype!r}")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as it is; the message names the fix."""


def _dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"model directory {str(p)!r} does not exist; pass --model DIR with a "
                              "Hugging Face checkpoint (or write one with `ladr-rt init-tiny DIR`)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}/config.json is missing: not a Hugging Face checkpoint directory")
    return p


def _read_json(f: Path, what: str) -> Any:
    """A JSON file of the checkpoint, or one line naming the file and what is wrong with it."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {what}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{f} is not UTF-8 text; {what}") from None
    except OSError as e:
        raise CheckpointError(f"{f} cannot be read ({e.strerror or e}); {what}") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = _dir(path)
    f = p / "config.json"
    d = _read_json(f, "restore it from the checkpoint's source")
    try:
        return ModelConfig.from_json_dict(d)
    except ValueError as e:  # ConfigError names the field
        raise CheckpointError(f"{f}: {e}") from None


def _inside(p: Path, name: Any, index: Path) -> Path:
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index}: weight_map values must be shard file names, got {name!r}")
    # Lexical, not resolved: a Hugging Face cache snapshot's shards are symlinks into ../../blobs,
    # which is fine; a name that climbs out of the directory or is absolute is not.
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{index} points at {name!r}, outside the model directory; a checkpoint's shards "
                              "live inside it: re-download the checkpoint")
    return p / rel


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a checkpoint, refusing pickle-only checkpoints."""
    p = _dir(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        d = _read_json(index, "re-download the checkpoint")
        wm = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index} has no 'weight_map' object (tensor name -> shard file); re-download the "
                                  "checkpoint")
        files = [_inside(p, n, index) for n in wm.values()]  # type and place of every entry first
        files = sorted(set(files))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{p}: shard(s) {', '.join(missing)} named in model.safetensors.index.json "
                                  "are missing; re-download the checkpoint")
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise CheckpointError(f"{index} names non-safetensors shard(s) {', '.join(bad[:3])}; ladr-rt loads "
                                  "safetensors only — convert them with safetensors.torch.save_file")
        return files
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{p} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); ladr-rt loads "
                              "safetensors only — convert them with safetensors.torch.save_file")
    raise CheckpointError(f"{p} has no *.safetensors weights")


def checkpoint_digest(path: str | os.PathLike) -> str:
    """Identity of the weights: sha256 over every shard's name and the sha256 of its whole
    content, so changing any byte of any tensor changes it. Names and contents only, no
    paths or mtimes: a copy of a checkpoint keeps the identity (and its engines).

    Hashing runs at ~0.9 GB/s (16 GB: ~19 s), so each shard's sum is cached per user
    (``file_sha256s``) and recomputed only when the shard's size, mtime, ctime or inode change."""
    import hashlib

    files = weight_files(path)
    sums = file_sha256s(files)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sums[f]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# A file's sha256 is reused while its stat key is unchanged. ctime is part of the key because
# nothing short of root or a clock change can set it back: a same-size overwrite that restores
# the mtime (touch -d, rsync -t, os.utime) still moves the ctime, so it is re-hashed.
_CACHE_FORMAT = 1


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def digest_cache_file(directory: Path) -> Path | None:
    """Where the sums of the files in ``directory`` (resolved) are cached:
    ``$XDG_CACHE_HOME/ladr-rt/sha256/<hash of the directory>.json`` (default ``~/.cache``).

    Per user, never beside the files: a model directory may be read-only (the package's own
    assets, a shared Hugging Face cache), shared between users, or packaged (``assets/**``
    is package data, and a cache file there would ship in a wheel)."""
    import hashlib

    base = os.environ.get("XDG_CACHE_HOME", "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    except RuntimeError:  # no home directory: hash without a cache
        return None
    key = hashlib.sha256(str(directory).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return root / "ladr-rt" / "sha256" / f"{key}.json"


def _read_digest_cache(cache: Path | None, directory: Path) -> dict[str, Any]:
    """The cached entries, or {} for a missing, unreadable or damaged cache (never an error:
    it is rewritten on the next store)."""
    if cache is None:
        return {}
    try:
        d = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return {}
    if not (isinstance(d, dict) and d.get("format") == _CACHE_FORMAT and d.get("dir") == str(directory)
            and isinstance(d.get("files"), dict)):
        return {}
    return {n: e for n, e in d["files"].items()
            if isinstance(e, dict) and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
            and isinstance(e.get("stat"), list) and all(type(x) is int for x in e["stat"])}


def _write_digest_cache(cache: Path | None, directory: Path, entries: dict[str, Any]) -> None:
    """Atomic rewrite; failure (read-only home, full disk) only costs a re-hash next time."""
    from .fileio import atomic_write_text

    if cache is None:
        return
    live = {n: e for n, e in entries.items() if (directory / n).exists()}  # forget deleted files
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps({"format": _CACHE_FORMAT, "dir": str(directory), "files": live},
                                            indent=0, sort_keys=True) + "\n")
    except OSError:
        return
    _prune_digest_caches(cache.parent)


_pruned: set[Path] = set()


def _prune_digest_caches(root: Path) -> None:
    """Once per process: drop the cache files of directories that no longer exist (temp
    directories, deleted checkpoints), so the cache does not grow without bound."""
    if root in _pruned:
        return
    _pruned.add(root)
    try:
        for f in root.glob("*.json"):
            try:
                d = json.loads(f.read_text(encoding="utf-8")).get("dir")
            except (OSError, ValueError, AttributeError):
                d = None
            if not isinstance(d, str) or not Path(d).is_dir():
                f.unlink(missing_ok=True)
    except OSError:
        pass


def file_sha256s(files: list[Path]) -> dict[Path, str]:
    """sha256 (hex) of each file's whole content, read from the per-user cache
    (``digest_cache_file``) when the file's size, mtime, ctime and inode are the cached ones.
    Symlinks are followed (the cache is keyed by the real file). Raises OSError for a file
    that cannot be read."""
    import hashlib
    import time

    out: dict[Path, str] = {}
    by_dir: dict[Path, list[tuple[Path, Path]]] = {}
    for f in files:
        real = Path(os.path.realpath(f))
        by_dir.setdefault(real.parent, []).append((f, real))
    for directory, group in by_dir.items():
        cache = digest_cache_file(directory)
        entries = _read_digest_cache(cache, directory)
        changed = False
        for f, real in group:
            key = _stat_key(real.stat())
            e = entries.get(real.name)
            if e is not None and e["stat"] == key:
                out[f] = e["sha256"]
                continue
            with real.open("rb") as fh:
                sha = hashlib.file_digest(fh, "sha256").hexdigest()
            out[f] = sha
            # Cached only if the file did not change while it was read, and was last written over
            # 2 s ago: on a file system with coarse timestamps a write later in the same tick
            # would leave the key as it is (git's "racy clean" problem).
            if _stat_key(real.stat()) == key and time.time_ns() - key[1] > 2_000_000_000:
                entries[real.name] = {"sha256": sha, "stat": key}
                changed = True
        if changed:
            _write_digest_cache(cache, directory, entries)
    return out


def remember_sha256(f: Path, sha256: str, hashed: os.stat_result) -> None:
    """Cache a sum computed elsewhere (the build hashes its files in the temp directory, then
    renames them): stored only if ``f`` is still the file that was hashed (same inode, size and
    mtime; a rename moves only the ctime), so the first run after a build does not re-read it."""
    real = Path(os.path.realpath(f))
    try:
        st = real.stat()
    except OSError:
        return
    if (st.st_ino, st.st_size, st.st_mtime_ns) != (hashed.st_ino, hashed.st_size, hashed.st_mtime_ns):
        return
    cache = digest_cache_file(real.parent)
    entries = _read_digest_cache(cache, real.parent)
    entries[real.name] = {"sha256": sha256, "stat": _stat_key(st)}
    _write_digest_cache(cache, real.parent, entries)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            # Copied out of the file's mapping into memory of its own: safetensors maps the file,
            # and a mapped tensor reads the file for as long as it lives, so truncating or
            # rewriting a shard under a running server would kill it with SIGBUS. Once loaded,
            # the model does not depend on its files.
            part = {k: v.clone() for k, v in load_file(str(f)).items()}
        except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise CheckpointError(f"{f} is not a readable safetensors file ({first}): truncated or damaged, as an "
                                  "interrupted download leaves it; re-download it") from None
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{f} repeats tensor(s) {', '.join(dup[:3])} of another shard; re-download the "
                                  "checkpoint")
        sd.update(part)
    return sd


def check_state_dict(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], where: str) -> None:
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    bad = [f"{k} {tuple(got[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
           if k in got and got[k].shape != s]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    if bad:
        problems.append(f"misshapen {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:4])}{' …' if len(extra) > 4 else ''}")
    if problems:
        raise CheckpointError(f"{where}: weights do not match config.json: {'; '.join(problems)}")
    not_float = [f"{k} ({v.dtype})" for k, v in got.items() if not v.dtype.is_floating_point]
    if not_float:
        raise CheckpointError(f"{where}: weight(s) {', '.join(not_float[:3])} are not floating point; a DiMOO "
                              "checkpoint stores float weights (bf16/fp16/fp32): re-export or re-download it")


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the reference transformer from a checkpoint directory (eval mode)."""
    from .model import DimooModel

    cfg = read_config(path)
    with torch.device("meta"):
        model = DimooModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = load_state_dict(path)
    check_state_dict(expected, sd, str(path))
    if dtype == DTYPES["fp8"]:
        from .fp8 import load_fp8

        return load_fp8(model, sd, device)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


TRANSFORMERS_FLOOR = 5  # the shipped and init-tiny tokenizers declare "TokenizersBackend", a transformers 5 class


def _old_transformers(p: Path) -> str | None:
    """The line to give when a tokenizer failed to load under a transformers older than the floor."""
    import transformers

    version = transformers.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return None
    if major >= TRANSFORMERS_FLOOR:
        return None
    try:
        cls = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        cls = None
    why = f"they declare tokenizer_class {cls!r}, which " if cls else "they may need a class that "
    return (f"{p}: the tokenizer files are fine, but {why}transformers {version} does not have: "
            f"ladr-rt needs transformers>={TRANSFORMERS_FLOOR}; pip install -U 'transformers>={TRANSFORMERS_FLOOR}'")


def load_tokenizer(path: str | os.PathLike):
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError as e:  # transformers checks its own dependencies' versions on import
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"transformers cannot be imported ({first}); pip install -U "
                              f"'transformers>={TRANSFORMERS_FLOOR}'") from None

    p = _dir(path)
    hf_logging.set_verbosity_error()  # config.json's model_type "llada" is unknown to transformers: harmless
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers and the Rust tokenizers raise many unrelated types
        old = _old_transformers(p)
        if old:  # intact files, too old a reader: blaming the files would send the user to re-download them
            raise CheckpointError(old) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{p}: no usable tokenizer files ({first}); restore tokenizer.json / "
                              "tokenizer_config.json from the checkpoint's source") from None
    if isinstance(tok, bool) or not callable(tok):
        raise CheckpointError(f"{p}: the tokenizer files do not describe a tokenizer; restore them")
    check_tokenizer(tok, read_config(p).layout, p)
    return tok


def check_tokenizer(tok, layout, where) -> None:
    """The tokenizer must be this checkpoint's: the unconditional template has to come out with
    config.json's ``<uncondition>`` id (another model's tokenizer gives its own id, and guidance
    then runs against a row the model never saw, with no error anywhere)."""
    from .tokens import TOKENIZER_LOCK

    text = layout.uncond_template.format(system=layout.system_prompt)
    try:
        with TOKENIZER_LOCK:
            ids = list(tok(text, add_special_tokens=True)["input_ids"])
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file fails in many ways
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{where}: the tokenizer cannot encode the unconditional template ({first}); restore "
                              "tokenizer.json / tokenizer_config.json from the checkpoint's source") from None
    if layout.uncondition not in ids:
        got = tok.convert_tokens_to_ids("<uncondition>") if "<uncondition>" in text else None
        said = f"maps <uncondition> to id {got}" if isinstance(got, int) else "does not produce it"
        raise CheckpointError(f"{where}: the tokenizer {said}, but config.json's uncondition id is "
                              f"{layout.uncondition}: these tokenizer files belong to another model; restore "
                              "tokenizer.json / tokenizer_config.json from this checkpoint's source")


# ---------------------------------------------------------------- writing

def save_checkpoint(out: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer,
                    vq=None, max_shard_bytes: int = 2 << 30, extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint in the published layout (sharded safetensors + index). Atomic."""
    import shutil

    from safetensors.torch import save_file

    from .fileio import _umask, replace_dir, temp_dir_beside

    final = Path(out)
    tmp = temp_dir_beside(final)
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in state_dict.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v.contiguous()
            size += nbytes
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = name
                total += v.numel() * v.element_size()
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        if vq is not None:
            vq.save_pretrained(str(tmp / "vqvae"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        # safetensors (the shards, vqvae/'s weights) writes 0600; a checkpoint is meant to be
        # shared, so every file gets what a plain open() gives.
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
