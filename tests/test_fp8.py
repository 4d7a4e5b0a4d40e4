"""Precision fp8 (ladr_rt/fp8.py): the layer's numerics, the shipped model at fp8 against fp32,
the refusals, and the 8B weight memory computed from the config."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ladr_rt import fp8
from ladr_rt.fp8 import Fp8Linear, dequant_reference, quantize_rows

from conftest import requires_cuda
from test_cli import run_cli

# Output error of the fp8 layer against its fp32 dequantise-then-matmul reference, relative to the
# output's largest magnitude: both multiply the same e4m3 operands exactly in fp32, so only the
# summation order differs (~1e-7 per add).
REF_TOL = 1e-5
# Against the full-precision product: two e4m3 roundings (3 mantissa bits, rel step 2^-4) on
# random data give ~0.036 relative Frobenius error (measured; torch 2.13 CPU).
QUANT_TOL = 0.06


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("mode", ["scaled_mm", "dequant"])
def test_fp8_linear_equals_dequantised_reference(mode):
    if mode == "scaled_mm" and not fp8.scaled_mm_works(torch.device("cpu")):
        pytest.skip(f"torch {torch.__version__} has no row-wise _scaled_mm on the CPU (2.11 takes per-tensor "
                    "scales only); the dequant mode is what runs there, tested by the other case")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different range
    x = torch.randn(3, 5, 64, generator=g) * torch.linspace(0.1, 10, 5)[None, :, None]  # tokens too
    layer = Fp8Linear.from_weight(w, torch.float32, mode=mode)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (48, 1)
    y = layer(x)
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert _rel(y, dequant_reference(layer, x)) < REF_TOL
    exact = x @ w.t()
    assert float((y - exact).norm() / exact.norm()) < QUANT_TOL
    # the layer quantizes: it is measurably not the fp32 product (a pass-through would be exact)
    assert float((y - exact).norm() / exact.norm()) > 1e-3


def test_quantize_rows_scales_and_broken_values():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [float("nan"), 1.0, 1.0], [float("inf"), 1.0, 1.0]])
    q, s = quantize_rows(w)
    assert torch.equal(q[0].float(), torch.zeros(3)) and float(s[0]) == pytest.approx(fp8.MIN_SCALE)  # zero row: zeros, no NaN
    assert float(q[1].float().abs().max()) == fp8.FP8_MAX and float(s[1]) == pytest.approx(2 / fp8.FP8_MAX)
    assert torch.isnan(q[2].float()).all() and torch.isnan(q[3].float()).any()  # never made finite
    layer = Fp8Linear.from_weight(torch.randn(16, 16), torch.float32)
    assert torch.isnan(layer(torch.full((2, 16), float("nan")))).all()


def test_tiny_checkpoint_loads_fp8_trunk_only(tiny_ckpt):
    from ladr_rt.checkpoint import DTYPES, load_model

    m32 = load_model(tiny_ckpt)
    m8 = load_model(tiny_ckpt, dtype=DTYPES["fp8"])
    t = m8.model.transformer
    lin = [n for n, m in t.blocks.named_modules() if isinstance(m, nn.Linear)]
    f8 = [n for n, m in t.blocks.named_modules() if isinstance(m, Fp8Linear)]
    assert not lin and len(f8) == 7 * len(t.blocks)  # q k v o gate up down in every block
    # embedding, norms and the codebook head stay in the compute dtype (fp32 on the CPU)
    assert t.wte.weight.dtype == t.ff_out.weight.dtype == t.ln_f.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in m8.parameters())
    assert torch.equal(t.ff_out.weight, m32.model.transformer.ff_out.weight)
    ids = torch.randint(0, 1000, (2, 12))
    a, b = m32(ids), m8(ids)
    assert torch.isfinite(b).all()
    assert 1e-4 < float((a - b).norm() / a.norm()) < 0.1


def test_shipped_model_fp8_codes_agree_with_fp32():
    """Temperature 0, same prompts: the fp8 run's final codes against the fp32 run's, at 128x128
    (8x8 codes) and baseline T=16 to stay quick. Measured on the shipped v2 model (2026-12-04,
    torch 2.13 CPU, a one-off script running this loop): 1.0, 1.0, 1.0, 0.953 over four prompts
    (at 256x256 the longer trajectories drift further: 0.68-0.87 at T=16); codes that ignore the
    weights would agree at ~1/79. Also one evaluation on the same input: the guided argmax agrees
    at >= 0.95 of the image positions (bench/fp8_study_v2.json: 0.988 along whole trajectories)."""
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline

    torch.set_num_threads(1)
    pipes = {d: LadrPipeline.from_pretrained(None, 128, 128, 24, dtype=d) for d in ("fp32", "fp8")}
    assert isinstance(pipes["fp8"].denoiser.model.model.transformer.blocks[0].q_proj, Fp8Linear)
    shares = []
    for prompt in ("a red circle and a blue square", "a circle left of a triangle"):
        codes = {d: p.generate_codes(prompt, SamplerConfig(name="baseline", steps=16, temperature=0.0, seed=0))[0]
                 for d, p in pipes.items()}
        shares.append(float((codes["fp32"] == codes["fp8"]).float().mean()))
    assert min(shares) >= 0.85, shares
    p32 = pipes["fp32"]
    ids, km = p32.prompt_rows("a red circle")
    logits = {}
    for d, p in pipes.items():
        out = torch.empty(2, p.seq.n_image, p.layout.codebook)
        p.denoiser(ids, km, out)
        logits[d] = out[0].argmax(-1)
    assert float((logits["fp32"] == logits["fp8"]).float().mean()) >= 0.95


def test_serve_runs_fp8():
    """`serve --dtype fp8` maps to ServeOptions.dtype; the scheduler's pipeline then has the fp8
    trunk and answers a request."""
    from ladr_rt.checkpoint import DTYPES
    from ladr_rt.config import SamplerConfig
    from ladr_rt.serve.server import ServeOptions

    opts = ServeOptions(dtype=DTYPES["fp8"], device="cpu", mode="sequential", height=64, width=64,
                        sampler=SamplerConfig(name="baseline", steps=4))
    opts.validate()
    sched = opts.scheduler_factory()()
    try:
        assert isinstance(sched.pipe.denoiser.model.model.transformer.blocks[0].ff_out, Fp8Linear)
        res = sched.submit("a red circle", seed=0).result(timeout=120)
        assert res is not None
    finally:
        sched.close()


def _fake_gpu(monkeypatch, cap=(8, 0), name="NVIDIA A100-SXM4-80GB"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: name)


def _one_line_error(r, *words):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_fp8_refused_on_gpu_without_fp8_cores(cmd, tiny_ckpt, tmp_path, monkeypatch):
    _fake_gpu(monkeypatch)
    args = ["--model", tiny_ckpt, "--device", "cuda", "--dtype", "fp8"]
    args += ["--prompt", "a red circle", "--out", tmp_path / "o.png"] if cmd == "generate" else ["--port", "0"]
    r = run_cli(cmd, *args)
    _one_line_error(r, "NVIDIA A100-SXM4-80GB", "8.0", "8.9", "--dtype bf16")
    assert not (tmp_path / "o.png").exists()


def test_fp8_refused_on_gpu_without_fp8_cores_python_api(monkeypatch):
    from ladr_rt.pipeline import LadrPipeline

    _fake_gpu(monkeypatch, cap=(8, 6), name="NVIDIA GeForce RTX 3090")
    with pytest.raises(fp8.Fp8Unsupported, match="RTX 3090 has 8.6"):
        LadrPipeline.from_pretrained(None, dtype="fp8", device="cuda")
    _fake_gpu(monkeypatch, cap=(9, 0), name="NVIDIA H100")
    fp8.check_fp8_device("cuda")  # Hopper passes


@pytest.mark.parametrize("backend", ["onnx", "tensorrt"])
def test_fp8_refused_for_onnx_and_tensorrt_builds(backend, tiny_ckpt, tmp_path):
    r = run_cli("build", "--model", tiny_ckpt, "--precision", "fp8", "--backend", backend, "--out",
                tmp_path / "e" / "x", "--device", "cpu")
    _one_line_error(r, "--precision fp8", f"--backend {backend}", "Q/DQ", "quantization toolkit")
    assert not (tmp_path / "e").exists()


def test_8b_weight_bytes_match_the_model_built_from_the_config():
    """weight_bytes counts from the config; here the same numbers come from the 8B model itself,
    built on the meta device (no memory), split into the trunk's linears and the rest."""
    from ladr_rt.config import ModelConfig
    from ladr_rt.model import DimooModel

    cfg = ModelConfig()  # Lumina-DiMOO's 8B sizes are ModelConfig's defaults
    with torch.device("meta"):
        m = DimooModel(cfg)
    lin = [mod for mod in m.model.transformer.blocks.modules() if isinstance(mod, nn.Linear)]
    n_lin = sum(mod.weight.numel() for mod in lin)
    n_rows = sum(mod.out_features for mod in lin)
    n_all = sum(p.numel() for p in m.parameters())
    assert fp8.weight_bytes(cfg, "fp32")["total"] == 4 * n_all
    assert fp8.weight_bytes(cfg, "bf16")["total"] == 2 * n_all
    assert fp8.weight_bytes(cfg, "fp8")["total"] == n_lin + 4 * n_rows + 2 * (n_all - n_lin)
    gib = {p: fp8.weight_bytes(cfg, p)["total"] / 2 ** 30 for p in ("fp32", "bf16", "fp8")}
    assert 30 < gib["fp32"] < 32 and 15 < gib["bf16"] < 16 and 8.5 < gib["fp8"] < 9.5  # the numbers docs/fp8.md gives


def test_memory_script_reports_config_numbers_and_refuses_fp8_cards(capsys):
    import importlib.util
    import json
    from pathlib import Path

    from ladr_rt.config import ModelConfig

    path = Path(__file__).resolve().parents[1] / "bench" / "fp8_memory.py"
    spec = importlib.util.spec_from_file_location("fp8_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--size", "1024"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for p in ("fp32", "bf16", "fp8"):
        assert last[p] == round(fp8.weight_bytes(ModelConfig(), p)["total"] / 2 ** 30, 3)
    rep = mod.report(1024)
    cards = {c["card"]: c for c in rep["cards"]}
    assert cards["A100 80 GB"]["fp8"] == "no fp8 tensor cores" and cards["H100 80 GB"]["fp8"] == "yes"
    # fp8's temporaries make its activations larger than bf16's, its weights far smaller
    pr = rep["precisions"]
    assert pr["fp8"]["activations_est_gib"]["fused_attention"] > pr["bf16"]["activations_est_gib"]["fused_attention"]
    assert pr["fp8"]["weights_gib"] < 0.6 * pr["bf16"]["weights_gib"]


@pytest.mark.gpu
@requires_cuda
def test_fp8_layer_on_cuda_matches_reference():
    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip(f"{torch.cuda.get_device_name()} has no fp8 tensor cores (compute capability < 8.9)")
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 512, device="cuda", generator=g)
    x = torch.randn(2, 64, 512, device="cuda", generator=g).bfloat16()
    layer = Fp8Linear.from_weight(w, torch.bfloat16)
    assert layer.mode == "scaled_mm"
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), dequant_reference(layer, x)) < 1e-2  # bf16 output rounding: 2^-8
