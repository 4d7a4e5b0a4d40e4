"""Tiny checkpoints in the published DiMOO format, for tests and first runs.

They keep DiMOO's real vocabulary size and special ids (so the constants are exercised)
and shrink everything else. Weights are random: images from them are noise.
"""
from __future__ import annotations

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
    """Write a complete DiMOO-format checkpoint directory (sharded, with index, tokenizer, vqvae/)."""
    from .checkpoint import CheckpointError, save_checkpoint

    cfg = cfg or tiny_config()
    out = Path(out)
    # The directory is replaced as a whole, so only an empty one or one this function wrote may
    # be overwritten: anything else holds somebody's files.
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise CheckpointError(f"{out} exists and is not a directory; choose a new directory name")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise CheckpointError(f"{out} is not empty and is not a tiny checkpoint written by ladr-rt; nothing was "
                                  "changed: choose a new or empty directory")
        foreign = sorted(str(f.relative_to(out)) for f in out.rglob("*") if not _ours(f.relative_to(out)))
        if foreign:
            raise CheckpointError(f"{out} holds files init-tiny did not write ({', '.join(foreign[:3])}); nothing "
                                  "was changed: move them out or choose another directory")
    lay = cfg.layout
    tok = word_tokenizer(uncondition_id=lay.uncondition)
    return save_checkpoint(out, cfg, random_state_dict(cfg, seed, dtype), tok, tiny_vq(lay.codebook, seed=seed),
                           max_shard_bytes=max_shard_bytes,
                           extra_files={MARKER: "written by `ladr-rt init-tiny`; random weights, its images are noise\n"})


MARKER = "LADR_TINY_CHECKPOINT"  # init-tiny may overwrite a directory only if it holds this file


def _ours(rel: Path) -> bool:
    """What write_tiny_checkpoint writes (tokenizer files vary a little with transformers)."""
    top = rel.parts[0]
    if top == "vqvae":
        return len(rel.parts) == 1 or (len(rel.parts) == 2 and rel.name in ("config.json",
                                                                           "diffusion_pytorch_model.safetensors"))
    return len(rel.parts) == 1 and (top in (MARKER, "config.json", "model.safetensors.index.json")
                                    or (top.startswith("model-") and top.endswith(".safetensors"))
                                    or top.startswith(("tokenizer", "special_tokens_map")))
