"""Attention choices (ladr_rt/attention.py): each one's logits against SDPA + bias, the block
mask following a key mask rewritten in place (a serving slot's admission), which kernel a
choice names, and the per-candidate timing the GPU check reads. CUDA-only kernels (cuDNN
attention, compiled FlexAttention on Triton) are tested under ``@pytest.mark.gpu``."""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from ladr_rt import attention as A
from ladr_rt.config import ImageSpec, TokenLayout
from ladr_rt.denoiser import EagerDenoiser
from ladr_rt.tokens import SequenceLayout


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny(device="cpu", dtype=torch.float32, n_kv_heads=None, codebook=64):
    from ladr_rt.model import DimooModel
    from ladr_rt.tiny import tiny_config

    torch.manual_seed(0)
    layout = TokenLayout(codebook=codebook)
    kw = {} if n_kv_heads is None else {"n_kv_heads": n_kv_heads}
    cfg = tiny_config(n_layers=2, weight_tying=True, layout=layout, vocab_size=layout.image_offset + codebook, **kw)
    return DimooModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)


def rows(model, device="cpu", pads=(0, 9), spec=ImageSpec(32, 48, 24)):
    """ids, key_mask [2, L] with ``pads`` left-padding keys per row, and the layout."""
    seq = SequenceLayout(spec, model.cfg.layout)
    L = seq.seq_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, L), generator=g)
    km = torch.ones(2, L, dtype=torch.bool)
    for r, p in enumerate(pads):
        km[r, :p] = False
    return ids.to(device), km.to(device), seq


def logits(model, choice, ids, km, seq):
    den = EagerDenoiser(model, seq.image_positions, attention=choice)
    out = torch.empty(ids.shape[0], seq.n_image, model.cfg.layout.codebook, dtype=den.logits_dtype, device=ids.device)
    den(ids, km, out)
    return out


def test_choices_resolve_per_device_and_cuda_only_ones_are_refused_elsewhere():
    assert A.resolve("auto", "cpu") == "sdpa" and A.resolve("auto", "cuda:0") == "cudnn"
    assert A.resolve("flex", "cpu") == "flex" and A.resolve("sdpa", "cuda") == "sdpa"
    with pytest.raises(A.AttentionError, match="needs a CUDA device"):
        A.resolve("cudnn", "cpu")
    with pytest.raises(A.AttentionError, match="choose one of auto, sdpa, cudnn, flex"):
        A.resolve("flash", "cpu")
    assert A.attention_kernel("cpu", torch.float32, 16, 40) == "sdpa-cpu"
    assert A.attention_kernel("cpu", torch.float32, 16, 40, "flex") == "flex-cpu"


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_flex_logits_equal_sdpa_with_the_key_bias(n_kv_heads):
    """Padded rows (9 keys hidden in the uncond row): the flex block mask hides exactly the
    keys the additive bias does (fp32), and in bf16 flex strays from the fp32 logits no more than
    SDPA in bf16 does. MHA and GQA."""
    model = tiny(n_kv_heads=n_kv_heads)
    ids, km, seq = rows(model)
    ref = logits(model, "sdpa", ids, km, seq)
    assert rel(logits(model, "flex", ids, km, seq), ref) < 1e-5
    # the mask matters: without it the logits move by far more than that
    assert rel(logits(model, "flex", ids, torch.ones_like(km), seq), ref) > 1e-3
    half = tiny(dtype=torch.bfloat16, n_kv_heads=n_kv_heads)  # the same seeded weights, rounded
    e_sdpa = rel(logits(half, "sdpa", ids, km, seq), ref)
    e_flex = rel(logits(half, "flex", ids, km, seq), ref)
    assert e_flex < max(2 * e_sdpa, 1e-2), (e_flex, e_sdpa)


def test_flex_block_mask_follows_the_key_mask_rewritten_in_place():
    """A serving slot admits a prompt of another length by rewriting the key-mask buffer in place;
    a captured graph keeps the block mask built at capture. It must read the new values."""
    model = tiny()
    ids, km, seq = rows(model, pads=(0, 9))
    den = EagerDenoiser(model, seq.image_positions, attention="flex")
    out = torch.empty(2, seq.n_image, 64)
    den(ids, km, out)
    built = A.key_padding(km, torch.float32, "flex")
    km[0, :5] = False  # admission: row 0 now has 5 padding keys, row 1 none
    km[1, :] = True
    assert A.key_padding(km, torch.float32, "flex") is built  # same buffer, same block mask
    den(ids, km, out)
    assert rel(out, logits(model, "sdpa", ids, km.clone(), seq)) < 1e-5


@pytest.mark.slow
def test_compiled_flex_on_cpu_equals_sdpa(monkeypatch):
    """The compiled kernel (inductor's CPU flex template), as CUDA runs it compiled (Triton)."""
    monkeypatch.setattr(A, "flex_compile_cpu", True)
    model = tiny()
    ids, km, seq = rows(model)
    assert A.attention_kernel("cpu", torch.float32, model.cfg.head_dim, seq.seq_len, "flex") == "flex-cpu-compiled"
    assert rel(logits(model, "flex", ids, km, seq), logits(model, "sdpa", ids, km, seq)) < 1e-5


def test_time_candidates_times_each_choice_at_a_shape():
    t = A.time_candidates("cpu", torch.float32, rows=2, n_heads=2, head_dim=16, seq_len=64, n_pad=7, warmup=1, reps=2)
    assert set(t) == {"sdpa", "flex", "unmasked-sdpa"}  # cudnn: CUDA only
    assert t["sdpa"]["kernel"] == "sdpa-cpu" and t["flex"]["kernel"] == "flex-cpu"
    assert all(v["s"] > 0 for v in t.values()), t


def test_a_benchmark_row_names_its_denoisers_kernel():
    import types

    model = tiny()
    _, _, seq = rows(model)
    assert A.describe(EagerDenoiser(model, seq.image_positions, "flex"), 8, seq.seq_len) == "flex-cpu"
    assert A.describe(EagerDenoiser(model, seq.image_positions), 8, seq.seq_len) == "sdpa-cpu"
    ort = types.SimpleNamespace(name="onnxruntime", device=torch.device("cpu"))
    assert "exported SDPA + bias" in A.describe(ort, 8, seq.seq_len)


def test_the_engine_graph_keeps_sdpa_with_the_bias():
    """The exported graph's attention stays the portable SDPA + additive bias, whatever the
    eager denoiser's choice: run_trunk's default."""
    import inspect

    from ladr_rt.model import run_trunk

    assert inspect.signature(run_trunk).parameters["attention"].default == "sdpa"


# ------------------------------------------------------------------ GPU (skip here with the reason)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("choice", ["cudnn", "flex"])
def test_cuda_choices_equal_sdpa_within_bf16_at_dimoo_head_dim(choice):
    """bf16, head_dim 128 (DiMOO's), padded rows: each fast path against SDPA + bias."""
    from ladr_rt.model import DimooModel
    from ladr_rt.tiny import tiny_config

    torch.manual_seed(0)
    layout = TokenLayout(codebook=8192)
    cfg = tiny_config(n_layers=2, d_model=256, n_heads=2, mlp_hidden_size=512, weight_tying=True, layout=layout,
                      vocab_size=layout.image_offset + 8192)
    assert cfg.head_dim == 128
    model = DimooModel(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    ids, km, seq = rows(model, "cuda", pads=(3, 40), spec=ImageSpec(256, 256, 64))
    ref = logits(model, "sdpa", ids, km, seq)
    got = logits(model, choice, ids, km, seq)
    assert torch.isfinite(got).all() and rel(got, ref) < 3e-2
    name = A.attention_kernel("cuda", torch.bfloat16, cfg.head_dim, seq.seq_len, choice, cfg.n_heads)
    assert name.startswith("flex" if choice == "flex" else "sdpa-"), name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("choice", ["cudnn", "flex"])
def test_cuda_choice_under_a_captured_graph_follows_admissions(choice):
    """The evaluation captured once (torch-graph), then the key mask rewritten in place as an
    admission does: the replay equals an eager SDPA evaluation of the new rows."""
    from ladr_rt.engines.torch_graph import TorchGraphDenoiser

    model = tiny("cuda", torch.bfloat16, codebook=8192)
    ids, km, seq = rows(model, "cuda", pads=(0, 9))
    den = TorchGraphDenoiser(model, seq.image_positions, attention=choice)
    out = torch.empty(2, seq.n_image, 8192, dtype=torch.bfloat16, device="cuda")
    den(ids, km, out)
    den(ids, km, out)
    assert den.graph is not None
    km[0, :6] = False
    km[1, :] = True
    den(ids, km, out)
    torch.cuda.synchronize()
    assert rel(out, logits(model, "sdpa", ids, km.clone(), seq)) < 3e-2
