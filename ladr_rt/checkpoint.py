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

import torch

from .config import ModelConfig

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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


def read_config(path: str | os.PathLike) -> ModelConfig:
    p = _dir(path)
    try:
        return ModelConfig.from_json_dict(json.loads((p / "config.json").read_text()))
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{p}/config.json is not a usable LLaDA/DiMOO config ({type(e).__name__}: {e})") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors shards of a checkpoint, refusing pickle-only checkpoints."""
    p = _dir(path)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise CheckpointError(f"{p}: shard(s) {', '.join(missing)} named in model.safetensors.index.json "
                                  "are missing; re-download the checkpoint")
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    pickles = [f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{p} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); ladr-rt loads "
                              "safetensors only — convert them with safetensors.torch.save_file")
    raise CheckpointError(f"{p} has no *.safetensors weights")


def checkpoint_digest(path: str | os.PathLike, samples: int = 16) -> str:
    """Identity of the weights without reading 16 GB: per shard its name, size, header and
    ``samples`` 64 KiB blocks spread evenly over the tensor data (the last one included), so
    retrained weights saved over the same shapes change it; mtimes are left out on purpose
    (copying a checkpoint must not invalidate its engines)."""
    import hashlib

    block = 1 << 16
    h = hashlib.sha256()
    for f in weight_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:  # the safetensors header names every tensor, its dtype and offsets
            for i in range(samples + 1):
                fh.seek(max(0, (size - block) * i // samples))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        sd.update(load_file(str(f)))
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


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load the reference transformer from a checkpoint directory (eval mode)."""
    from .model import DimooModel

    cfg = read_config(path)
    with torch.device("meta"):
        model = DimooModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = load_state_dict(path)
    check_state_dict(expected, sd, str(path))
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = _dir(path)
    hf_logging.set_verbosity_error()  # config.json's model_type "llada" is unknown to transformers: harmless
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: no usable tokenizer files ({str(e).splitlines()[0]})") from None


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
            os.chmod(tmp / name, 0o666 & ~_umask())  # safetensors writes 0600; a checkpoint is meant to be shared
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
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
