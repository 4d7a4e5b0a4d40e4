"""--cuda-graph and --attention (config.RunOptions): what each value maps to, and the one-line
refusals where a value cannot apply (a forced CUDA-only choice on the CPU, any choice with an
engine, which fixed its runtime when it was built)."""
from __future__ import annotations

import pytest

from engine_fixtures import one_line_error, run_cli_inproc
from ladr_rt import config
from ladr_rt.config import RunOptions


def test_options_map_to_the_denoiser_per_device():
    assert RunOptions().graphed("cpu") is False and RunOptions(cuda_graph="off").graphed("cpu") is False
    assert RunOptions(cuda_graph="on").graphed("cuda") is True
    assert RunOptions(cuda_graph="off").graphed("cuda") is False
    assert RunOptions().graphed("cuda") is config.CUDA_GRAPH_AUTO_ON_CUDA
    with pytest.raises(ValueError, match="--cuda-graph on needs a CUDA device"):
        RunOptions(cuda_graph="on").graphed("cpu")
    with pytest.raises(ValueError, match="--attention cudnn needs a CUDA device"):
        RunOptions(attention="cudnn").validate("cpu")
    RunOptions(attention="cudnn").validate("cuda")
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        RunOptions(cuda_graph="yes").validate()
    with pytest.raises(ValueError, match="leave --attention out with --engine"):
        RunOptions(attention="flex").refuse_for_engine()
    RunOptions().refuse_for_engine()


def test_from_pretrained_builds_the_chosen_denoiser(tiny_ckpt, monkeypatch):
    """cuda_graph on -> the torch-graph denoiser with the chosen attention (its class stood in for:
    the real one needs CUDA); off -> the eager one. A forced choice the device lacks is refused
    before the weights load."""
    from ladr_rt import checkpoint
    from ladr_rt.denoiser import EagerDenoiser
    from ladr_rt.engines import torch_graph
    from ladr_rt.pipeline import LadrPipeline

    made = []

    class StandIn(EagerDenoiser):
        name = "torch-graph"

        def __init__(self, model, positions, attention):
            made.append(attention)
            super().__init__(model, positions, attention)

    monkeypatch.setattr(torch_graph, "TorchGraphDenoiser", StandIn)
    monkeypatch.setattr(RunOptions, "graphed", lambda self, device_type: self.cuda_graph == "on")
    pipe = LadrPipeline.from_pretrained(tiny_ckpt, 32, 32, 24, options=RunOptions(cuda_graph="on", attention="flex"))
    assert type(pipe.denoiser) is StandIn and made == ["flex"] and pipe.denoiser.attention == "flex"
    pipe = LadrPipeline.from_pretrained(tiny_ckpt, 32, 32, 24, options=RunOptions(cuda_graph="off"))
    assert type(pipe.denoiser) is EagerDenoiser and pipe.denoiser.attention == "sdpa"
    monkeypatch.undo()

    def no_load(*a, **kw):
        raise AssertionError("the weights loaded before the option was refused")

    monkeypatch.setattr(checkpoint, "load_model", no_load)
    with pytest.raises(ValueError, match="--cuda-graph on needs a CUDA device"):
        LadrPipeline.from_pretrained(tiny_ckpt, options=RunOptions(cuda_graph="on"), device="cpu")


def test_cli_passes_the_options_and_refuses_in_one_line(tiny_ckpt, monkeypatch, tmp_path):
    from ladr_rt.pipeline import LadrPipeline

    seen = []

    def capture(*a, options=RunOptions(), **kw):
        seen.append(options)
        raise ValueError("stopped here")

    monkeypatch.setattr(LadrPipeline, "from_pretrained", staticmethod(capture))
    out = tmp_path / "x.png"
    r = run_cli_inproc("generate", "--model", tiny_ckpt, "--prompt", "a", "--device", "cpu", "--out", out,
                       "--cuda-graph", "off", "--attention", "flex")
    one_line_error(r, "stopped here")
    assert seen == [RunOptions(cuda_graph="off", attention="flex")]
    r = run_cli_inproc("generate", "--model", tiny_ckpt, "--prompt", "a", "--device", "cpu", "--out", out,
                       "--cuda-graph", "on")
    one_line_error(r, "--cuda-graph on needs a CUDA device")
    r = run_cli_inproc("generate", "--model", tiny_ckpt, "--prompt", "a", "--device", "cpu", "--out", out,
                       "--attention", "cudnn")
    one_line_error(r, "--attention cudnn needs a CUDA device")
    r = run_cli_inproc("generate", "--engine", tmp_path / "none", "--prompt", "a", "--out", out, "--cuda-graph", "off")
    one_line_error(r, "leave --cuda-graph out with --engine")
    assert len(seen) == 1 and not out.exists()


def test_serve_refuses_a_cuda_graph_on_the_cpu_in_one_line(tiny_ckpt):
    from conftest import import_extra

    import_extra("fastapi", "serve", "ladr-rt serve needs it")
    import_extra("uvicorn", "serve", "ladr-rt serve needs it")
    r = run_cli_inproc("serve", "--model", tiny_ckpt, "--device", "cpu", "--cuda-graph", "on")
    one_line_error(r, "--cuda-graph on needs a CUDA device")
