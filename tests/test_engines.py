"""Engines on the CPU: build -> generate --engine, teacher-forced parity, one-line errors.

The ONNX graph tested here with onnxruntime is the file TensorRT would parse; the
TensorRT/GPU tests at the end skip with their reason where there is no GPU.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine_fixtures import TINY_SHAPE, build_args, one_line_error, run_cli_inproc, tiny_engine  # noqa: F401

from ladr_rt.build import TOLERANCES, compare, validation_inputs
from ladr_rt.checkpoint import load_model, load_tokenizer, read_config
from ladr_rt.config import ImageSpec, SamplerConfig
from ladr_rt.engines import EngineError, read_manifest
from ladr_rt.engines.graph import EngineGraph
from ladr_rt.engines.ort import OrtDenoiser
from ladr_rt.tokens import SequenceLayout


def _seq(ckpt, **shape):
    s = {**TINY_SHAPE, **shape}
    return SequenceLayout(ImageSpec(s["height"], s["width"], s["prompt_budget"]), read_config(ckpt).layout)


def _eager_logits(model, seq, ids, mask):
    with torch.inference_mode():
        return model(ids.long(), mask, image_positions=seq.image_positions).float().numpy()


def _ort_logits(onnx_path, ids, mask, n, k):
    den = OrtDenoiser(onnx_path)
    out = torch.empty(ids.shape[0], n, k)
    den(ids.to(torch.int32).contiguous(), mask.contiguous(), out)
    return out.numpy()


# ------------------------------------------------------------------ build + generate


def test_build_writes_engine_and_manifest(tiny_engine, tiny_ckpt):
    m = read_manifest(tiny_engine)
    seq = _seq(tiny_ckpt)
    assert m["backend"] == "onnx" and m["runner"] == "onnxruntime" and m["precision"] == "fp32"
    assert m["grid"] == [3, 5] and m["seq_len"] == seq.seq_len and m["n_image"] == 15
    assert m["io"]["inputs"] == [{"name": "input_ids", "shape": [2, seq.seq_len], "dtype": "int32"},
                                 {"name": "key_mask", "shape": [2, seq.seq_len], "dtype": "bool"}]
    assert m["io"]["outputs"] == [{"name": "logits", "shape": [2, 15, 8192], "dtype": "float32"}]
    assert m["model"]["config_digest"] == read_config(tiny_ckpt).digest()
    assert m["versions"]["torch"] == torch.__version__ and m["versions"]["onnx"]
    v = m["validation"]["onnxruntime"]
    assert v["rel_err"] <= TOLERANCES["fp32"].rel_err and v["top1"] == 1.0
    d = tiny_engine.parent
    assert sorted(m["files"]) == ["tiny.onnx", "tiny.onnx.data"]
    assert all((d / f).stat().st_size == e["size"] and len(e["sha256"]) == 64 for f, e in m["files"].items())
    assert not [p for p in d.iterdir() if p.name.startswith(".")], "temp files left behind"
    # the graph only carries the codebook rows of the head: the data is wte + blocks + 8192 rows
    cfg = read_config(tiny_ckpt)
    assert m["files"]["tiny.onnx.data"]["size"] < (cfg.vocab_size + 8192 + 4 * cfg.d_model) * cfg.d_model * 4 * 1.05


@pytest.mark.parametrize("sampler,cfg", [("ladr", 4.0), ("baseline", 0.0)])
def test_generate_engine_tokens_equal_eager_at_temperature_0(tiny_engine, tiny_ckpt, tmp_path, sampler, cfg):
    common = ["--prompt", "a red circle above a blue square", "--steps", "10", "--temperature", "0", "--cfg", cfg,
              "--sampler", sampler, "--no-progress"]
    # Pinned to fp32 on the CPU: on a CUDA machine generate defaults to cuda + bf16, and the
    # comparison is exact.
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--device", "cpu", *common, "--out", tmp_path / "e.png",
                       "--save-tokens", tmp_path / "e.npy")
    assert r.exit_code == 0, r.output
    assert "onnxruntime" in r.stdout
    r = run_cli_inproc("generate", "--model", tiny_ckpt, "--height", TINY_SHAPE["height"], "--width",
                       TINY_SHAPE["width"], "--prompt-budget", TINY_SHAPE["prompt_budget"], "--device", "cpu",
                       "--dtype", "fp32", *common, "--out", tmp_path / "g.png", "--save-tokens", tmp_path / "g.npy")
    assert r.exit_code == 0, r.output
    assert "eager" in r.stdout
    a, b = np.load(tmp_path / "e.npy"), np.load(tmp_path / "g.npy")
    assert a.shape == (3, 5)
    np.testing.assert_array_equal(a, b)


def test_profile_build(tiny_ckpt, tmp_path):
    out = tmp_path / "p"
    r = run_cli_inproc("build", "--profile", "export/tiny-fp32.toml", "--model", tiny_ckpt, "--out", out,
                       "--no-validate")
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert (m["build_args"]["height"], m["build_args"]["width"], m["build_args"]["prompt_budget"]) == (64, 96, 32)
    assert "validation" in m and "onnxruntime" not in m["validation"]


# ------------------------------------------------------------------ parity suite


def test_teacher_forced_parity_fp32(tiny_engine, tiny_ckpt):
    """Same ids and mask into eager and onnxruntime: tight fp32 agreement on every output."""
    seq = _seq(tiny_ckpt)
    model = load_model(tiny_ckpt)
    tol = TOLERANCES["fp32"]
    for ids, mask in validation_inputs(load_tokenizer(tiny_ckpt), seq, batch=1, seed=7):
        m = compare(_ort_logits(f"{tiny_engine}.onnx", ids, mask, seq.n_image, 8192),
                    _eager_logits(model, seq, ids, mask))
        assert m["max_abs_err"] < 1e-4 and m["rel_err"] <= tol.rel_err, m
        assert m["cosine"] >= tol.cosine and m["top1"] == 1.0, m


def test_teacher_forced_parity_fp16_and_token_agreement(tiny_ckpt, tmp_path):
    """fp16 graph vs fp16 eager, against the stated fp16 tolerance (reason in TOLERANCES)."""
    out = tmp_path / "h"
    r = run_cli_inproc(*build_args(tiny_ckpt, out, precision="fp16"))
    assert r.exit_code == 0, r.output
    seq = _seq(tiny_ckpt)
    model = load_model(tiny_ckpt, dtype=torch.float16)
    tol = TOLERANCES["fp16"]
    for ids, mask in validation_inputs(load_tokenizer(tiny_ckpt), seq, batch=1, seed=3):
        m = compare(_ort_logits(f"{out}.onnx", ids, mask, seq.n_image, 8192), _eager_logits(model, seq, ids, mask))
        assert m["rel_err"] <= tol.rel_err and m["top1"] >= tol.top1 and m["cosine"] >= tol.cosine, m
    # Whole run at temperature 0: fp16 rounding may flip near-ties, so agreement (not equality)
    # against the fp16 eager run, threshold 0.8 of the 15 codes.
    from ladr_rt.pipeline import LadrPipeline

    scfg = SamplerConfig(steps=8, temperature=0.0)
    e = LadrPipeline.from_engine(out, device="cpu").generate_codes("a cat in a tree", scfg)[0]
    g = LadrPipeline.from_pretrained(tiny_ckpt, dtype=torch.float16, device="cpu", **TINY_SHAPE).generate_codes(
        "a cat in a tree", scfg)[0]
    assert (e == g).float().mean().item() >= 0.8


def test_bf16_on_cpu_onnxruntime_is_refused_with_the_fix(tiny_ckpt, tmp_path):
    """onnxruntime's CPU provider has no bf16 kernels (Mul/MatMul): bf16 parity can only run
    on a GPU (TensorRT); on the CPU the build must say so in one line and install nothing."""
    r = run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "b", precision="bf16"))
    one_line_error(r, "bf16", "--precision fp32")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ self-validation and atomic builds


def _corrupt_one_weight(onnx_path):
    """Overwrite an MLP weight's bytes in the external data file with a large constant.

    The exporter's optimizer stores linear weights pre-transposed under generated names, so
    the MLP matrix is found by shape ([d, hidden]), not by name; a [2B, L] constant (the key
    bias's zeros, which a constant shift of softmax inputs would leave harmless) is skipped."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for init in proto.graph.initializer:
        if (len(init.dims) == 2 and init.external_data and 16 <= init.dims[0] < init.dims[1] != 8192
                and init.data_type == onnx.TensorProto.FLOAT):
            loc = {e.key: e.value for e in init.external_data}
            with open(onnx_path.parent / loc["location"], "r+b") as f:
                f.seek(int(loc["offset"]))
                f.write(np.full(int(loc["length"]) // 4, 3.0, np.float32).tobytes())
            return init.name
    raise AssertionError("no MLP initializer found in the exported graph")


def test_validation_fails_on_a_corrupted_exported_weight(tiny_ckpt, tmp_path):
    from ladr_rt.build import ValidationError, eager_references, export_onnx, ort_runner, validate_with

    seq = _seq(tiny_ckpt)
    graph = EngineGraph.from_model(load_model(tiny_ckpt), seq.seq_len, seq.image_positions)
    path = tmp_path / "g.onnx"
    inputs = validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)
    refs = eager_references(graph, inputs, "fp32")
    export_onnx(graph, path, 2, seq.seq_len)
    ok = validate_with(ort_runner(path, torch.device("cpu")), inputs, refs, "fp32", "graph")
    assert ok["top1"] == 1.0
    _corrupt_one_weight(path)
    with pytest.raises(ValidationError, match="does not match the eager model"):
        validate_with(ort_runner(path, torch.device("cpu")), inputs, refs, "fp32", "graph")


def _no_engine_named(d, name):
    left = [p.name for p in d.iterdir()]
    assert not [n for n in left if n.startswith(name) or n.startswith(f".{name}")], left


def test_build_with_corrupted_export_fails_and_installs_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import ladr_rt.build as b

    real = b.export_onnx

    def export_then_corrupt(graph, path, *a, **k):
        real(graph, path, *a, **k)
        _corrupt_one_weight(path)

    monkeypatch.setattr(b, "export_onnx", export_then_corrupt)
    r = run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "bad"))
    one_line_error(r, "does not match the eager model", "top-1")
    _no_engine_named(tmp_path, "bad")


def test_build_killed_midway_leaves_no_engine(tiny_ckpt, tmp_path, monkeypatch):
    import ladr_rt.build as b

    def killed(*a, **k):
        raise KeyboardInterrupt  # what Ctrl-C / SIGINT delivers mid-validation

    monkeypatch.setattr(b, "validate_with", killed)
    with pytest.raises(KeyboardInterrupt):
        b.build(b.resolve_options(model=str(tiny_ckpt), out=str(tmp_path / "k"), **TINY_SHAPE), log=lambda s: None)
    _no_engine_named(tmp_path, "k")
    # Dying after the files moved but before the manifest: generate still refuses.
    monkeypatch.undo()
    monkeypatch.setattr(b, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        b.build(b.resolve_options(model=str(tiny_ckpt), out=str(tmp_path / "k"), **TINY_SHAPE), log=lambda s: None)
    assert not (tmp_path / "k.json").exists()
    r = run_cli_inproc("generate", "--engine", tmp_path / "k", "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "no engine manifest", "ladr-rt build")


def test_rebuild_replaces_engine(tiny_ckpt, tiny_engine, tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    for p in tiny_engine.parent.glob("tiny.*"):
        shutil.copy(p, d / p.name)
    r = run_cli_inproc(*build_args(tiny_ckpt, d / "tiny", prompt_budget=40))
    assert r.exit_code == 0, r.output
    assert read_manifest(d / "tiny")["build_args"]["prompt_budget"] == 40


# ------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize("opt,val,needle", [("--height", 64, "built for height 48, this run asks for 64"),
                                            ("--prompt-budget", 40,
                                             "built for prompt budget 32, this run asks for 40")])
def test_manifest_mismatch_names_difference_and_build_command(tiny_engine, tmp_path, opt, val, needle):
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--prompt", "x", opt, val, "--out", tmp_path / "o.png")
    line = one_line_error(r, needle, "ladr-rt build --model")
    assert f"{opt} {val}" in line  # the command that would build a matching engine
    assert not (tmp_path / "o.png").exists()


def test_manifest_mismatch_other_model(tiny_engine, tiny_gqa_ckpt, tmp_path):
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--model", tiny_gqa_ckpt, "--prompt", "x", "--out",
                       tmp_path / "o.png")
    one_line_error(r, "config.json is not the one it was built from", "ladr-rt build")


def test_manifest_mismatch_retrained_weights(tiny_engine, tiny_ckpt, tmp_path):
    """Same config and tensor shapes, other values (a retrain saved over the same layout): refused."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from ladr_rt.checkpoint import checkpoint_digest

    d = tmp_path / "retrained"
    shutil.copytree(tiny_ckpt, d)
    assert checkpoint_digest(d) == checkpoint_digest(tiny_ckpt), "a plain copy keeps the identity"
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    tensors = load_file(str(shard))
    last = sorted(tensors)[-1]
    tensors[last] = (tensors[last] + np.float32(0.5)).astype(np.float32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert checkpoint_digest(d) != checkpoint_digest(tiny_ckpt)
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--model", d, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "weights", "ladr-rt build")


def _copy_engine(engine, d):
    d.mkdir(exist_ok=True)
    for p in engine.parent.glob(f"{engine.name}.*"):
        shutil.copy(p, d / p.name)
    return d / engine.name


@pytest.mark.parametrize("victim", ["tiny.onnx", "tiny.onnx.data"])
def test_truncated_onnx_is_a_one_line_error(tiny_engine, tmp_path, victim):
    e = _copy_engine(tiny_engine, tmp_path / "t")
    f = e.parent / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "truncated", "ladr-rt build")


def test_truncated_onnx_with_matching_manifest_sizes_is_a_one_line_error(tiny_engine, tmp_path):
    """Past the size and digest checks (manifest edited to match the truncated file),
    onnxruntime's own load fails, in one line."""
    import hashlib

    e = _copy_engine(tiny_engine, tmp_path / "t")
    f = e.parent / "tiny.onnx"
    f.write_bytes(f.read_bytes()[:1000])
    m = json.loads((e.parent / "tiny.json").read_text())
    m["files"]["tiny.onnx"] = {"size": 1000, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (e.parent / "tiny.json").write_text(json.dumps(m))
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "onnxruntime cannot load", "rebuild")


def test_truncated_plan_is_a_one_line_error(tiny_engine, tmp_path):
    e = _copy_engine(tiny_engine, tmp_path / "t")
    m = json.loads((e.parent / "tiny.json").read_text())
    (e.parent / "tiny.plan").write_bytes(b"\0" * 100)
    m.update(backend="tensorrt", runner="tensorrt", gpu={"name": "GPU", "compute_capability": "9.0"})
    m["build_args"].update(backend="tensorrt", keep_onnx=True)
    m["files"]["tiny.plan"] = {"size": 4096, "sha256": "0" * 64}
    (e.parent / "tiny.json").write_text(json.dumps(m))
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "tiny.plan is 100 bytes, the build wrote 4096", f"--backend tensorrt --out {e}")


def test_missing_manifest_and_garbage_manifest(tiny_engine, tmp_path):
    r = run_cli_inproc("generate", "--engine", tmp_path / "nope", "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "no engine manifest", "ladr-rt build")
    e = _copy_engine(tiny_engine, tmp_path / "t")
    (e.parent / "tiny.json").write_text("{not json")
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "not valid JSON", "ladr-rt build")


def test_prompt_over_engine_budget(tiny_engine, tmp_path):
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--prompt", "red " * 40, "--out", tmp_path / "o.png")
    one_line_error(r, "prompt budget of 32")
    assert not (tmp_path / "o.png").exists()


def test_build_bad_options(tiny_ckpt, tmp_path):
    one_line_error(run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "x", height=50)), "--height 50")
    one_line_error(run_cli_inproc(*build_args(tmp_path / "none", tmp_path / "x")), "does not exist")
    one_line_error(run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "no" / "x")), "does not exist; create it")
    one_line_error(run_cli_inproc("build", "--profile", tmp_path / "none.toml"), "no such file")
    one_line_error(run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "x", prompt_budget=4)), "prompt budget of 4")
    (tmp_path / "bad.toml").write_text("heigth = 5\n")
    one_line_error(run_cli_inproc("build", "--profile", tmp_path / "bad.toml"), "unknown key(s) heigth")


def test_build_help_documents_defaults():
    r = run_cli_inproc("build", "--help")
    assert r.exit_code == 0
    for s in ("--model", "--height", "--width", "--prompt-budget", "--precision", "--backend", "--out", "--batch",
              "--profile", "default: 512]", "default: fp32]", "default: onnx]"):
        assert s in r.output


# ------------------------------------------------------------------ TensorRT without TensorRT


def _has_real_tensorrt() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except ImportError:
        return False


@pytest.mark.skipif(_has_real_tensorrt(), reason="TensorRT is installed here; this checks the message without it")
def test_tensorrt_backend_without_tensorrt_says_how_to_install(tiny_ckpt, tmp_path):
    args = build_args(tiny_ckpt, tmp_path / "t")
    args[args.index("onnx")] = "tensorrt"
    one_line_error(run_cli_inproc(*args), "pip install 'ladr-rt[tensorrt]'")
    assert list(tmp_path.iterdir()) == []


def test_package_and_cli_import_without_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"  # makes `import tensorrt` raise ImportError
            "import ladr_rt.cli, ladr_rt.build, ladr_rt.engines, ladr_rt.engines.trt, ladr_rt.engines.torch_graph\n"
            "assert 'tensorrt' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "from ladr_rt.engines.trt import import_trt\n"
            "try:\n    import_trt()\nexcept ValueError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install 'ladr-rt[tensorrt]'" in r.stdout


# ------------------------------------------------------------------ GPU (skip with a reason on CPU machines)

NO_CUDA = "no CUDA device on this machine: CUDA-graph replay and TensorRT need one"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
trt_only = pytest.mark.skipif(not (torch.cuda.is_available() and _has_real_tensorrt()),
                              reason="needs TensorRT (pip install 'ladr-rt[tensorrt]') and a CUDA device")


@pytest.mark.gpu
@pytest.mark.tensorrt
@trt_only
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_plan_parity_and_graph_replay(tiny_ckpt, tmp_path, precision):
    """The plan built from the ONNX above vs eager (stated tolerance), and CUDA-graph replay
    of the enqueue == plain execute_async_v3, exactly."""
    from ladr_rt.engines.trt import TrtDenoiser

    args = build_args(tiny_ckpt, tmp_path / "t", precision=precision, device="cuda")
    args[args.index("onnx")] = "tensorrt"
    r = run_cli_inproc(*args)
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "t")
    v = m["validation"]["tensorrt"]
    tol = TOLERANCES[precision]
    assert v["rel_err"] <= tol.rel_err and v["top1"] >= tol.top1
    seq = _seq(tiny_ckpt)
    ids, mask = validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)[1]
    ids, mask = ids.cuda(), mask.cuda()
    plain, replay = (torch.empty(2, seq.n_image, 8192, device="cuda") for _ in range(2))
    TrtDenoiser(tmp_path / "t.plan", "cuda", cuda_graph=False)(ids, mask, plain)
    den = TrtDenoiser(tmp_path / "t.plan", "cuda", cuda_graph=True)
    for _ in range(3):
        den(ids, mask, replay)
    torch.cuda.synchronize()
    assert den.graph is not None
    assert torch.equal(plain, replay)


@pytest.mark.gpu
@gpu
def test_torch_graph_replay_equals_eager_exactly(tiny_ckpt):
    from ladr_rt.denoiser import EagerDenoiser
    from ladr_rt.engines.torch_graph import TorchGraphDenoiser

    seq = _seq(tiny_ckpt)
    model = load_model(tiny_ckpt, device="cuda")
    ids, mask = validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)[1]
    ids, mask = ids.long().cuda(), mask.cuda()
    a, b = (torch.empty(2, seq.n_image, 8192, device="cuda") for _ in range(2))
    EagerDenoiser(model, seq.image_positions)(ids, mask, a)
    den = TorchGraphDenoiser(model, seq.image_positions)
    for _ in range(3):
        den(ids, mask, b)
    torch.cuda.synchronize()
    assert den.graph is not None and torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_onnxruntime_cuda_parity(tiny_engine, tiny_ckpt):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install 'ladr-rt[gpu]')")
    seq = _seq(tiny_ckpt)
    ids, mask = validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)[1]
    den = OrtDenoiser(f"{tiny_engine}.onnx", "cuda", tf32=False)  # what load_denoiser passes for fp32 engines
    assert den.session.get_providers()[0] == "CUDAExecutionProvider"
    out = torch.empty(2, seq.n_image, 8192, device="cuda")
    den(ids.to(torch.int32).cuda(), mask.cuda(), out)
    m = compare(out.cpu().numpy(), _eager_logits(load_model(tiny_ckpt), seq, ids, mask))
    tol = TOLERANCES["fp32"]  # TF32 off: the fp32 bar, not a looser one
    assert m["rel_err"] <= tol.rel_err and m["top1"] >= tol.top1, m


def test_engine_error_is_value_error():
    assert issubclass(EngineError, ValueError)  # the CLI's one-line path catches ValueError


def test_step_runner_is_plain_step_off_cuda(tiny_engine):
    from ladr_rt.pipeline import LadrPipeline
    from ladr_rt.samplers import make_sampler

    from ladr_rt.tokens import build_rows

    pipe = LadrPipeline.from_engine(tiny_engine, device="cpu")
    ids, mask = build_rows(pipe.tokenizer, ["a cat"], pipe.seq)
    pipe.ids.copy_(ids)
    pipe.key_mask.copy_(mask)
    state = pipe._state(4)
    run = pipe.step_runner(make_sampler(SamplerConfig(steps=4), state))
    run()
    assert int(state.step) == 1  # ran one real step; no capture on CPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_whole_step_graph_replay_equals_eager_steps(tiny_ckpt, temperature):
    """A graph_safe denoiser on CUDA: the captured step replayed T times gives the same codes
    as plain steps with the same seed."""
    from ladr_rt.engines.torch_graph import TorchGraphDenoiser
    from ladr_rt.pipeline import LadrPipeline

    plain = LadrPipeline.from_pretrained(tiny_ckpt, device="cuda", **TINY_SHAPE)
    graphed = LadrPipeline.from_pretrained(tiny_ckpt, device="cuda", **TINY_SHAPE)
    graphed.denoiser = TorchGraphDenoiser(graphed.denoiser.model, graphed.seq.image_positions)
    scfg = SamplerConfig(steps=8, temperature=temperature, seed=5)
    a = plain.generate_codes("a cat in a tree", scfg)[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture falls back with a warning: fail here
        b = graphed.generate_codes("a cat in a tree", scfg)[0]
    assert torch.equal(a, b)
    # the step graph holds the evaluation; the denoiser never captured one of its own
    assert graphed.denoiser.graph is None and graphed.denoiser.cuda_graph is True


def test_plan_for_another_gpu_is_refused():
    from ladr_rt.engines import EngineMismatch, check_manifest

    m = {"_dir": "engines", "name": "x", "gpu": {"compute_capability": "9.0"},
         "model": {"config_digest": "a", "weights_digest": "b"},
         "build_args": {"model": "M", "height": 512, "width": 512, "prompt_budget": 64, "batch": 1,
                        "precision": "bf16", "backend": "tensorrt", "out": "engines/x"}}
    check_manifest(m, compute_capability="9.0", height=512)
    with pytest.raises(EngineMismatch, match=r"compute capability 9.0, this GPU has 8.0.*ladr-rt build --model M"):
        check_manifest(m, compute_capability="8.0")
