"""Tiny checkpoints in the published DiMOO format, for tests and first runs.

They keep DiMOO's real vocabulary size and special ids (so the constants are exercised)
and shrink everything else. Weights are random: images from them are noise.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, TokenLayout

TEMPLATE_TAGS = ("<system>", "</system>", "<user>", "</user>")
WORDS = ("generate an image according to the text prompt . , a an the of and with on in left right above below "
         "red green blue yellow orange purple white black gray pink brown cyan one two three four circle circles "
         "square squares triangle triangles ring rings cross crosses cat dog tree house car sky sea").split()


def word_tokenizer(words=WORDS, tags=TEMPLATE_TAGS, uncondition_id: int | None = None,
                   first_tag_id: int | None = None):
    """A word-level Hugging Face fast tokenizer (tokenizer.json), built offline.

    Template tags are special tokens so ``<user>`` stays one token, as in DiMOO's tokenizer.
    ``<uncondition>`` gets ``uncondition_id`` (DiMOO: 126351) so the uncond row carries
    the real special id.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    next_id = first_tag_id if first_tag_id is not None else len(vocab)
    for t in tags:
        vocab[t] = next_id
        next_id += 1
    vocab["<uncondition>"] = uncondition_id if uncondition_id is not None else next_id
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(tags) + ["<uncondition>", "<unk>", "<pad>"]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=list(tags) + ["<uncondition>"])


def tiny_config(d_model: int = 32, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
                mlp_hidden_size: int = 64, vocab_size: int = 134548, layout: TokenLayout = TokenLayout(),
                rope_theta: float = 500000.0, weight_tying: bool = False,
                default_size: tuple[int, int] = (64, 96)) -> ModelConfig:
    return ModelConfig(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads, n_layers=n_layers,
                       mlp_hidden_size=mlp_hidden_size, vocab_size=vocab_size, rope_theta=rope_theta,
                       weight_tying=weight_tying, layout=layout, default_size=default_size)


def random_state_dict(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Seeded numpy weights (identical across torch versions), scaled so logits are O(1)."""
    from .model import DimooModel

    rng = np.random.default_rng(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DimooModel(cfg).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight") or k.endswith("ln_f.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif k.endswith("wte.weight"):
            a = rng.standard_normal(shape)
        else:  # linear [out, in]
            a = rng.standard_normal(shape) / np.sqrt(shape[1])
        sd[k] = torch.from_numpy(a.astype(np.float32)).to(dtype)
    return sd


def tiny_vq(codebook: int = 8192, channels: int = 8, seed: int = 0):
    """A diffusers VQModel with scale factor 16 (five blocks) and a `codebook`-entry codebook."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    n = 5  # 2 ** (n - 1) = 16
    return VQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=(channels,) * n, layers_per_block=1, latent_channels=4, num_vq_embeddings=codebook,
        vq_embed_dim=4, norm_num_groups=4, sample_size=64, lookup_from_codebook=True, mid_block_add_attention=False,
    ).eval()


def write_tiny_checkpoint(out: str | os.PathLike, cfg: ModelConfig | None = None, seed: int = 0,
                          max_shard_bytes: int = 16 << 20, dtype=torch.float32) -> Path:
    """Write a complete DiMOO-format checkpoint directory (sharded, with index, tokenizer, vqvae/).

    ``out`` may be new, an empty directory, or one this function wrote before and nobody has
    changed since: its marker records the name and sha256 of every file written, and only those
    exact files are replaced (anything else there, or any of them edited, refuses with nothing
    changed). A symlink to a directory is written through. An existing directory keeps its
    inode (files move into it), so a shell sitting in it (``init-tiny .``) stays in it."""
    import shutil

    from .checkpoint import CheckpointError, save_checkpoint
    from .fileio import _umask, temp_dir_beside

    cfg = cfg or tiny_config()
    out = _target(Path(out))
    old = _owned_files(out) if out.exists() else None  # refuses before any work
    lay = cfg.layout
    tok = word_tokenizer(uncondition_id=lay.uncondition)
    stage = temp_dir_beside(out)
    try:
        new = save_checkpoint(stage / "new", cfg, random_state_dict(cfg, seed, dtype), tok,
                              tiny_vq(lay.codebook, seed=seed), max_shard_bytes=max_shard_bytes)
        files = {str(f.relative_to(new)): _sha256(f) for f in sorted(new.rglob("*")) if f.is_file()}
        marker = {"written_by": "ladr-rt init-tiny", "note": "random weights: its images are noise; init-tiny "
                  "replaces only these files, and only while their sha256 are these", "files": files}
        (new / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        (new / MARKER).chmod(0o666 & ~_umask())
        if old is None:
            os.replace(new, out)
        else:
            _move_in(new, out, old, stage / "old")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


MARKER = "LADR_TINY_CHECKPOINT"  # JSON: the files init-tiny wrote and their sha256


def _target(out: Path) -> Path:
    """``out`` as an absolute path without '.'/'..' (``init-tiny .`` names the directory, not
    '.'), a symlink to a directory resolved to it."""
    from .checkpoint import CheckpointError

    absolute = Path(os.path.abspath(out))
    if absolute.is_symlink():
        real = Path(os.path.realpath(absolute))
        if not real.is_dir():
            raise CheckpointError(f"{out} is a symlink to {real}, which is not a directory; point it at a directory "
                                  "or choose a new directory name")
        return real
    return absolute


def _sha256(f: Path) -> str:
    import hashlib

    with f.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _owned_files(out: Path) -> list[str]:
    """The files of an existing ``out`` that init-tiny may replace ([] for an empty directory);
    CheckpointError (one line, nothing changed) for anything else."""
    from .checkpoint import CheckpointError

    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose a new directory name")
    entries = sorted(out.rglob("*"))
    if not entries:
        return []
    unchanged = "nothing was changed: move them out or choose another directory"
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        assert isinstance(files, dict) and all(isinstance(v, str) for v in files.values())
    except FileNotFoundError:
        raise CheckpointError(f"{out} is not empty and is not a tiny checkpoint written by ladr-rt; nothing was "
                              "changed: choose a new or empty directory") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{out}/{MARKER} does not list the files init-tiny wrote (an older ladr-rt, or "
                              "edited); nothing was changed: delete the directory yourself or choose another") from None
    rels = {str(e.relative_to(out)): e for e in entries}
    dirs = {str(Path(n).parent) for n in files} - {"."}
    foreign = sorted(n for n, e in rels.items()
                     if n != MARKER and not (n in files and e.is_file() and not e.is_symlink())
                     and not (n in dirs and e.is_dir() and not e.is_symlink()))
    if foreign:
        raise CheckpointError(f"{out} holds files init-tiny did not write ({', '.join(foreign[:3])}"
                              f"{' …' if len(foreign) > 3 else ''}); {unchanged}")
    changed = sorted(n for n in files if n in rels and _sha256(rels[n]) != files[n])
    if changed:
        raise CheckpointError(f"{out}: {', '.join(changed[:3])} changed since init-tiny wrote "
                              f"{'it' if len(changed) == 1 else 'them'}; nothing was changed: keep your edits by "
                              "choosing another directory, or delete this one yourself")
    return [n for n in files if n in rels] + [MARKER]


def _move_in(new: Path, out: Path, old_files: list[str], trash: Path) -> None:
    """Replace ``old_files`` of ``out`` by the files of ``new``, file by file (each rename is
    atomic); the marker goes last, so until then the old marker still covers every file. An
    error puts the old files back."""
    moved: list[tuple[Path, Path]] = []  # (from, to), undone in reverse
    created: list[Path] = []

    def move(src: Path, dst: Path) -> None:
        if not dst.parent.is_dir():
            dst.parent.mkdir(parents=True)
            created.append(dst.parent)
        os.replace(src, dst)
        moved.append((src, dst))

    names = sorted(str(f.relative_to(new)) for f in new.rglob("*") if f.is_file())
    names.remove(MARKER)
    try:
        for n in old_files:  # the old files out of the way first (a shard count may have changed)
            move(out / n, trash / n)
        for n in names + [MARKER]:
            move(new / n, out / n)
    except BaseException:
        for src, dst in reversed(moved):
            try:
                os.replace(dst, src)
            except OSError:
                pass
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for n in old_files:  # directories the old files left empty (vqvae/ of an old layout)
        d = (out / n).parent
        if d != out and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
