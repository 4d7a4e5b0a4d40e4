"""The inductor engine on the CPU: `build --backend inductor` (an AOTInductor .pt2) -> generate
--engine equal to eager, a bf16 build that validates, and every refusal in one line.

A compile takes ~15-40 s on 2 cores, so there are three in all, each a session fixture shared
by the tests here: the tiny checkpoint in fp32 and bf16, and the shipped testbed model in fp32
(marked slow). Refusals work on copies of the built engine or stop before any compile.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from engine_fixtures import TINY_SHAPE, one_line_error, run_cli_inproc

from ladr_rt.build import TOLERANCES
from ladr_rt.engines import EngineError, load_denoiser, read_manifest
from ladr_rt.engines.manifest import FORMAT, build_command

TESTBED_SHAPE = {"height": 128, "width": 128, "prompt_budget": 32}  # 8 x 8 grid: the smallest useful compile


def inductor_args(model, out, precision="fp32", **shape):
    s = {**TINY_SHAPE, **shape}
    return ["build", "--model", model, "--height", s["height"], "--width", s["width"], "--prompt-budget",
            s["prompt_budget"], "--precision", precision, "--backend", "inductor", "--device", "cpu", "--out", out]


def _build(model, out, precision="fp32", **shape) -> Path:
    r = run_cli_inproc(*inductor_args(model, out, precision, **shape))
    assert r.exit_code == 0, r.output
    assert "[compile]" in r.stdout and "[validate] inductor vs eager" in r.stdout, r.stdout
    return out


@pytest.fixture(scope="session")
def tiny_inductor(tiny_ckpt, tmp_path_factory) -> Path:
    return _build(tiny_ckpt, tmp_path_factory.mktemp("ind") / "tiny")


@pytest.fixture(scope="session")
def tiny_inductor_bf16(tiny_ckpt, tmp_path_factory) -> Path:
    return _build(tiny_ckpt, tmp_path_factory.mktemp("ind16") / "tiny", "bf16")


@pytest.fixture(scope="session")
def testbed_inductor(tmp_path_factory) -> Path:
    from ladr_rt.shipped import model_dir

    return _build(model_dir(), tmp_path_factory.mktemp("indtb") / "tb", **TESTBED_SHAPE)


def _copy(engine: Path, d: Path) -> Path:
    d.mkdir(exist_ok=True)
    for p in engine.parent.glob(f"{engine.name}.*"):
        shutil.copy(p, d / p.name)
    return d / engine.name


def _edit(engine: Path, fn) -> None:
    p = engine.with_suffix(".json")
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _generate(engine_or_model, tmp_path, tag, sampler, cfg, shape=None):
    common = ["--prompt", "a red circle above a blue square", "--steps", "8", "--temperature", "0", "--cfg", cfg,
              "--sampler", sampler, "--device", "cpu", "--no-progress", "--out", tmp_path / f"{tag}.png",
              "--save-tokens", tmp_path / f"{tag}.npy"]
    if shape is None:
        r = run_cli_inproc("generate", "--engine", engine_or_model, *common)
    else:
        r = run_cli_inproc("generate", "--model", engine_or_model, "--height", shape["height"], "--width",
                           shape["width"], "--prompt-budget", shape["prompt_budget"], "--dtype", "fp32", *common)
    assert r.exit_code == 0, r.output
    return r, np.load(tmp_path / f"{tag}.npy")


# ------------------------------------------------------------------ build + generate


def test_inductor_build_writes_package_and_manifest(tiny_inductor, tiny_ckpt):
    m = read_manifest(tiny_inductor)
    assert m["format"] == FORMAT == 3
    assert m["backend"] == "inductor" and m["runner"] == "aoti" and m["build_args"]["device"] == "cpu"
    assert sorted(m["files"]) == ["tiny.pt2"]
    d = tiny_inductor.parent
    assert (d / "tiny.pt2").stat().st_size == m["files"]["tiny.pt2"]["size"]
    t = m["target"]
    assert t["device"] == "cpu" and t["torch"] == torch.__version__
    assert t["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and t["compile_seconds"] > 0
    v = m["validation"]["inductor"]
    assert v["rel_err"] <= TOLERANCES["fp32"].rel_err and v["top1"] == 1.0 and v["positions"] > 0
    assert sorted(p.name for p in d.iterdir()) == ["tiny.json", "tiny.pt2"], "temp or lock files left behind"
    line = build_command(m)
    assert "--backend inductor" in line and line.endswith("--device cpu")  # a rebuild makes the same package


@pytest.mark.parametrize("sampler,cfg", [("ladr", 4.0), ("baseline", 0.0)])
def test_inductor_generate_tokens_equal_eager_at_temperature_0(tiny_inductor, tiny_ckpt, tmp_path, sampler, cfg):
    r, a = _generate(tiny_inductor, tmp_path, "e", sampler, cfg)
    assert "inductor" in r.stdout
    _, b = _generate(tiny_ckpt, tmp_path, "g", sampler, cfg, TINY_SHAPE)
    assert a.shape == (3, 5)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ladr", "baseline"])
def test_inductor_testbed_tokens_equal_eager_at_temperature_0(testbed_inductor, tmp_path, sampler):
    from ladr_rt.shipped import model_dir

    cfg = 3.0 if sampler == "ladr" else 0.0
    _, a = _generate(testbed_inductor, tmp_path, "e", sampler, cfg)
    _, b = _generate(model_dir(), tmp_path, "g", sampler, cfg, TESTBED_SHAPE)
    assert a.shape == (8, 8)
    np.testing.assert_array_equal(a, b)


def test_pipeline_from_engine_picks_the_inductor_runner(tiny_inductor):
    from ladr_rt.engines.inductor import InductorDenoiser
    from ladr_rt.pipeline import LadrPipeline

    pipe = LadrPipeline.from_engine(tiny_inductor, "cpu")
    assert isinstance(pipe.denoiser, InductorDenoiser) and not pipe.denoiser.graph_safe
    with pytest.raises(ValueError, match="takes shape"):
        pipe.denoiser(pipe.ids[:1].contiguous(), pipe.key_mask[:1].contiguous(), pipe.logits[:1].contiguous())


def test_bf16_cpu_build_passes_its_own_validation(tiny_inductor_bf16):
    m = read_manifest(tiny_inductor_bf16)
    tol = TOLERANCES["bf16"]  # rel err <= 5e-2, margin-aware top-1 >= 0.95, cosine >= 0.995
    v = m["validation"]["inductor"]
    assert m["precision"] == "bf16" and m["validation"]["tolerance"]["rel_err"] == tol.rel_err
    assert v["rel_err"] <= tol.rel_err and v["top1"] >= tol.top1 and v["cosine"] >= tol.cosine, v
    assert v["rel_err"] > 0  # it ran in bf16: not bit-equal to the fp32 eager reference of an fp32 run


# ------------------------------------------------------------------ refusals at load


def test_package_from_another_torch_is_refused(tiny_inductor, tmp_path, monkeypatch):
    e = _copy(tiny_inductor, tmp_path / "v")
    monkeypatch.setattr(torch, "__version__", "9.9.0+other")
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.png")
    one_line_error(r, "compiled by torch", "this is torch 9.9.0+other", "rebuild it here", "--backend inductor",
                   "--device cpu`")


def test_package_for_another_cpu_isa_is_refused(tiny_inductor, tmp_path, monkeypatch):
    import ladr_rt.engines.inductor as ind

    built = read_manifest(tiny_inductor)["target"]["cpu_capability"]
    if built == "DEFAULT":
        pytest.skip("this machine's torch dispatches no vector ISA, so no CPU is below it")
    monkeypatch.setattr(ind, "cpu_capability", lambda: "DEFAULT")
    with pytest.raises(EngineError, match=f"compiled for {built} CPUs, this CPU runs DEFAULT.*rebuild it on this"):
        load_denoiser(read_manifest(_copy(tiny_inductor, tmp_path / "i")), "cpu")


def test_package_for_cuda_is_refused_on_a_machine_without_one(tiny_inductor, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for one without")
    e = _copy(tiny_inductor, tmp_path / "c")

    def to_cuda(m):
        m["target"] = {"device": "cuda", "torch": torch.__version__}
        m["build_args"]["device"] = "cuda"
        m["gpu"] = {"name": "NVIDIA H200", "compute_capability": "9.0"}

    _edit(e, to_cuda)
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "compiled for CUDA", "no CUDA device", "--device cpu")


def test_cpu_package_asked_to_run_on_another_device_kind_is_refused(tiny_inductor, tmp_path):
    from ladr_rt.engines.inductor import check_target

    m = read_manifest(_copy(tiny_inductor, tmp_path / "d"))
    with pytest.raises(EngineError, match="compiled for cpu, this run asks for cuda; run it with --device cpu"):
        check_target(m, torch.device("cuda", 0))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_truncated_or_edited_package_is_refused(tiny_inductor, tmp_path, how):
    e = _copy(tiny_inductor, tmp_path / how)
    pt2 = e.with_suffix(".pt2")
    data = bytearray(pt2.read_bytes())
    if how == "truncate":
        pt2.write_bytes(data[: len(data) // 2])
        needle = "truncated or replaced"
    else:
        data[len(data) // 2] ^= 0xFF
        pt2.write_bytes(data)
        needle = "does not hold what the build wrote"
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.png")
    one_line_error(r, str(pt2), needle, "--backend inductor")
    assert not (tmp_path / "o.png").exists()


def test_manifest_that_disagrees_with_its_package_is_refused(tiny_inductor, tiny_inductor_bf16, tmp_path):
    """The fp32 manifest over the bf16 package, its digest updated to fit: the sha256 check
    passes, the package's own metadata does not."""
    from ladr_rt.build import _sha256

    e = _copy(tiny_inductor, tmp_path / "x")
    shutil.copy(tiny_inductor_bf16.with_suffix(".pt2"), e.with_suffix(".pt2"))
    sha, st = _sha256(e.with_suffix(".pt2"))
    _edit(e, lambda m: m["files"].update({"tiny.pt2": {"size": st.st_size, "sha256": sha}}))
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.png")
    one_line_error(r, "and its manifest disagree", "precision: package bf16, manifest fp32", "rebuild")


def test_hand_edited_inductor_manifest_is_refused(tiny_inductor, tmp_path):
    e = _copy(tiny_inductor, tmp_path / "h")
    _edit(e, lambda m: m["target"].pop("torch"))
    with pytest.raises(EngineError, match="field 'target.torch' is missing.*rebuild"):
        read_manifest(e)
    _edit(e, lambda m: m.update(format=2))
    with pytest.raises(EngineError, match="needs manifest format 3"):
        read_manifest(e)


# ------------------------------------------------------------------ refusals at build (no compile)


def _nothing_installed(d: Path) -> None:
    assert not list(d.iterdir()), [p.name for p in d.iterdir()]


def test_build_without_a_cpp_compiler_is_refused_before_any_work(tiny_ckpt, tmp_path):
    import torch._inductor.config as cfg

    out = tmp_path / "o"
    out.mkdir()
    with cfg.patch({"cpp.cxx": ("/nonexistent/g++",)}):  # monkeypatch's undo would delete the config key
        r = run_cli_inproc(*inductor_args(tiny_ckpt, out / "tiny"))
    one_line_error(r, "needs a C++ compiler", "none was found", "apt-get install g++", "--backend onnx")
    _nothing_installed(out)


def test_build_with_a_broken_cpp_compiler_is_refused(tiny_ckpt, tmp_path):
    import torch._inductor.config as cfg

    fake = tmp_path / "broken-g++"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo broken 1.0; exit 0; }\n'
                    'echo "fatal error: omp.h: No such file or directory" >&2; exit 1\n')
    fake.chmod(0o755)
    out = tmp_path / "o"
    out.mkdir()
    with cfg.patch({"cpp.cxx": (str(fake),)}):
        r = run_cli_inproc(*inductor_args(tiny_ckpt, out / "tiny"))
    one_line_error(r, "cannot build a shared object", "omp.h", "install g++")
    _nothing_installed(out)


def test_cuda_build_without_triton_is_refused(monkeypatch):
    import sys

    from ladr_rt.build import BuildError
    from ladr_rt.engines.inductor import check_toolchain

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    with pytest.raises(BuildError, match="needs Triton, which is not installed; pip install triton"):
        check_toolchain(torch.device("cuda"))


def test_concurrent_inductor_build_is_refused(tiny_ckpt, tmp_path):
    from ladr_rt.build import _build_lock

    with _build_lock(tmp_path, "busy"):
        r = run_cli_inproc(*inductor_args(tiny_ckpt, tmp_path / "busy"))
    one_line_error(r, f"another build of {tmp_path / 'busy'} is running", "another --out")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_keep_onnx_with_inductor_is_refused(tiny_ckpt, tmp_path):
    r = run_cli_inproc(*inductor_args(tiny_ckpt, tmp_path / "k"), "--keep-onnx")
    one_line_error(r, "an inductor engine is its NAME.pt2 package")


# ------------------------------------------------------------------ CUDA (skipped here with the reason)


@pytest.mark.gpu
@requires_cuda
def test_cuda_package_validates_and_whole_step_graph_replay_equals_plain_steps(tiny_ckpt, tmp_path):
    """On CUDA the package is compiled with Triton, validates against eager, and its call is
    captured inside the pipeline's whole-step CUDA graph: replayed steps give the codes that
    plain steps through the same package give, with no capture warning."""
    import warnings

    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline

    out = tmp_path / "cu"
    args = inductor_args(tiny_ckpt, out)
    args[args.index("--device") + 1] = "cuda"
    r = run_cli_inproc(*args)
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m["target"]["device"] == "cuda" and m["gpu"]["compute_capability"]
    assert m["validation"]["inductor"]["rel_err"] <= TOLERANCES["fp32"].rel_err
    graphed = LadrPipeline.from_engine(out, "auto")
    plain = LadrPipeline.from_engine(out, "cuda")
    assert graphed.denoiser.device.type == "cuda" and graphed.denoiser.graph_safe
    plain.denoiser.graph_safe = False  # the same package called step by step
    for temperature in (0.0, 1.0):
        scfg = SamplerConfig(steps=8, temperature=temperature, seed=5)
        a = plain.generate_codes("a cat in a tree", scfg)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture falls back with a warning
            b = graphed.generate_codes("a cat in a tree", scfg)[0]
        assert torch.equal(a, b), temperature
    assert any(g is not None for g in graphed._graphs.entries.values())  # the step really was captured


def test_cuda_package_for_another_gpu_architecture_is_refused(tiny_inductor, tmp_path, monkeypatch):
    """A CUDA package holds kernels for one compute capability: another GPU is refused before
    the package is loaded (checked here without a GPU: the capability lookup is replaced)."""
    import ladr_rt.engines.trt as trt
    from ladr_rt.engines import EngineMismatch
    from ladr_rt.engines.inductor import check_target

    m = read_manifest(_copy(tiny_inductor, tmp_path / "a"))
    m.update(target={"device": "cuda", "torch": torch.__version__}, gpu={"name": "H200", "compute_capability": "9.0"})
    m["build_args"]["device"] = "cuda"
    monkeypatch.setattr(trt, "compute_capability", lambda device: "8.0")
    with pytest.raises(EngineMismatch, match="built for GPUs of compute capability 9.0, this GPU has 8.0.*--device cuda"):
        check_target(m, torch.device("cuda", 0))


def test_serve_runs_an_inductor_engine(tiny_inductor):
    """`serve --engine` loads through the same manifest path: the scheduler's pipeline has the
    inductor runner and finishes a request."""
    from ladr_rt.config import SamplerConfig
    from ladr_rt.serve.server import ServeOptions

    sched = ServeOptions(engine=str(tiny_inductor), device="cpu", sampler=SamplerConfig(steps=4)).scheduler_factory()()
    try:
        assert sched.pipe.denoiser.name == "inductor" and sched.pipe.batch == 1
        res = sched.submit("a red circle", seed=0).result(timeout=300)
    finally:
        sched.close()
    assert res.codes.shape == (3, 5) and 1 <= res.evaluations <= 4
