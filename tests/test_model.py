"""Reference model: loading, padding invariance, batch-2 CFG layout."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ladr_rt import load_model
from ladr_rt.checkpoint import CheckpointError, load_tokenizer, read_config
from ladr_rt.config import ImageSpec, TokenLayout
from ladr_rt.tokens import PromptTooLong, SequenceLayout, build_rows, text_ids


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return load_tokenizer(tiny_ckpt)


def test_entry_point_returns_full_vocab_logits(model):
    ids = torch.randint(0, 1000, (2, 17))
    with torch.inference_mode():
        out = model(ids)
    assert out.shape == (2, 17, 134548) and out.dtype == torch.float32


def test_sequence_layout_places_image_tokens(tok):
    seq = SequenceLayout(ImageSpec(48, 80, 40), TokenLayout())
    ids, km = build_rows(tok, ["a red circle"], seq)
    assert ids.shape == (2, seq.seq_len) == (2, 40 + 2 + 3 * 6 + 2)
    lay = seq.layout
    assert (ids[:, seq.image_positions] == lay.mask).all()
    newline_pos = [seq.image_start + r * 6 + 5 for r in range(3)]
    assert (ids[:, newline_pos] == lay.newline).all()
    assert ids[0, 40].item() == lay.boa and ids[0, 41].item() == lay.boi
    assert ids[0, -2:].tolist() == [lay.eoi, lay.eoa]
    assert lay.uncondition in ids[1].tolist() and lay.uncondition not in ids[0].tolist()
    # left padding: masked keys come first, and every real token is kept
    assert not km[0, 0] and km[0, -1]
    assert km[0].sum() == len(text_ids(tok, "a red circle", lay)) + len(seq.image_region())


@pytest.mark.parametrize("budget", [40, 57])
def test_left_padding_and_batched_cfg_equal_unpadded_evaluations(model, tok, budget):
    """One batch-2 padded evaluation == two separate unpadded ones, at every real position (fp32)."""
    seq = SequenceLayout(ImageSpec(48, 80, budget), TokenLayout())
    ids, km = build_rows(tok, ["two blue squares above a red ring"], seq)
    with torch.inference_mode():
        batched = model(ids, km)  # [2, L, V]
        for row in range(2):
            real = km[row]
            alone = model(ids[row : row + 1, real])[0]  # unpadded, no mask
            assert rel(batched[row, real], alone) < 1e-5
        fast = model(ids, km, image_positions=seq.image_positions)  # [2, N, 8192]
    assert fast.shape == (2, seq.n_image, 8192)
    assert rel(fast, batched[:, seq.image_positions, -8192:]) < 1e-6


def test_padding_between_prompt_and_image_would_break_invariance(model, tok):
    """Why we left-pad: right/middle padding shifts the image region's RoPE distances to the prompt."""
    seq = SequenceLayout(ImageSpec(48, 80, 40), TokenLayout())
    ids, km = build_rows(tok, ["a red circle"], seq)
    real = km[0]
    t = int((~real).sum())
    mid = torch.cat([ids[0, real][: 40 - t], ids[0, :t], ids[0, real][40 - t:]])[None]
    mid_mask = torch.cat([real[real][: 40 - t], real[:t], real[real][40 - t:]])[None]
    with torch.inference_mode():
        alone = model(ids[:1, real])[0, -seq.n_image - 2:]
        shifted = model(mid, mid_mask)[0, -seq.n_image - 2:]
    assert rel(shifted, alone) > 1e-4


def test_prompt_over_budget_names_the_budget(tok):
    n_uncond = len(text_ids(tok, None, TokenLayout()))
    seq = SequenceLayout(ImageSpec(48, 80, n_uncond + 2), TokenLayout())
    with pytest.raises(PromptTooLong, match=f"prompt budget of {n_uncond + 2}"):
        build_rows(tok, ["a red circle left of a blue square"], seq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_tracks_fp32(tiny_ckpt, model, dtype):
    half = load_model(tiny_ckpt, dtype=dtype)
    assert next(half.parameters()).dtype == dtype
    ids = torch.randint(0, 1000, (1, 20))
    with torch.inference_mode():
        a, b = half(ids).float(), model(ids)
    assert rel(a, b) < 3e-2  # bf16 has 8 mantissa bits; 2 layers stay within a few percent


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_pickle_only_checkpoint(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "pk")
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(d)


def test_names_missing_and_misshapen_keys(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt, tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_layers"] = 3  # blocks.2 missing
    cfg["mlp_hidden_size"] = 80  # every ff_proj misshapen
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.transformer.blocks.2.attn_norm.weight" in msg and "misshapen" in msg and "(80, 32)" in msg


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_config(tmp_path / "empty")


def test_each_denoiser_keeps_its_own_rope_tables(model):
    """Two pipelines at different resolutions share one model: the tables the first one's
    (possibly graph-captured) forward reads must keep their storage and values after the
    second one runs, since a CUDA graph reads them by address."""
    from ladr_rt.denoiser import EagerDenoiser

    seen = []  # the cos table block 0 was handed, per forward
    hook = model.model.transformer.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    runs = []
    for L in (12, 20):
        positions = torch.arange(4, L - 4)
        ids, mask = torch.randint(0, 1000, (2, L)), torch.ones(2, L, dtype=torch.bool)
        runs.append((EagerDenoiser(model, positions), ids, mask, torch.empty(2, len(positions), 8192)))
    try:
        den, ids, mask, out = runs[0]
        den(ids, mask, out)
        first = seen[-1]
        ptr, values = first.data_ptr(), first.clone()
        den2, ids2, mask2, out2 = runs[1]
        den2(ids2, mask2, out2)
        assert seen[-1].shape[0] == 20
        den(ids, mask, out)
    finally:
        hook.remove()
    assert seen[-1].data_ptr() == ptr, "the first denoiser's RoPE tables were replaced"
    assert torch.equal(first, values) and torch.equal(seen[-1], values)
