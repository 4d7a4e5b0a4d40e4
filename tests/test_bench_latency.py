"""The GPU latency suite's code path (bench/latency.py ``run_gpu_suite``), run on the CPU at
tiny size so the functions a GPU session will run at 8B have executed at least once.

No timings are asserted (the suite is a benchmark, not a test): only that every JSON field
a row promises is there and that the numbers are positive. The full 8B run stays the one a
GPU session triggers: ``python3 bench/latency.py --gpu``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "latency.py"
ROW_FIELDS = ("eval_s", "sampler_step_s", "whole_step_s", "flops_per_eval", "achieved_flops", "roofline_s",
              "roofline_fraction", "logits_std")


@pytest.fixture(scope="module")
def latency():
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_functions_on_cpu_tiny(latency, tmp_path):
    out = tmp_path / "latency_gpu.json"
    # The official-style row is covered by the GPU check's smoke run (tests/test_gpu_ready.py).
    res = latency.run_gpu_suite("tiny", resolutions=[(64, 96)], backends=("eager", "torch-graph", "onnxruntime",
                                                                          "tensorrt"),
                                device="cpu", prompt_budget=32, warmup=1, reps=2,
                                e2e_steps=6, ladr_evals=3, out=out, log=lambda s: None)
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    for k in ("hardware", "date", "config", "params", "weight_bytes", "matmul_peak_flops", "timing", "total_s"):
        assert k in on_disk, k
    assert on_disk["matmul_peak_flops"] > 0 and on_disk["params"] > 0 and on_disk["weights_std_block0"] > 0

    rows = {r["backend"]: r for r in on_disk["rows"]}
    assert set(rows) == {"eager", "onnxruntime"}  # torch-graph and TensorRT need CUDA
    skipped = {s["backend"]: s["reason"] for s in on_disk["skipped"]}
    assert set(skipped) == {"torch-graph", "tensorrt"} and "CUDA" in skipped["torch-graph"]
    assert "CUDA" in skipped["tensorrt"]
    for backend, r in rows.items():
        assert r["resolution"] == "64x96" and r["seq_len"] > 0 and r["n_image"] == 24
        for k in ROW_FIELDS:
            assert r[k] > 0, (backend, k, r[k])
        assert r["logits_finite"]  # random weights, never zeros
        assert r["whole_step_graph"] is False  # plain steps off CUDA
        assert "peak_memory_bytes" in r and r["peak_memory_bytes"] is None  # CUDA only
        assert r["fits_cards"].startswith("not measured")
        m = r["end_to_end_cost_model_s"]
        assert m["baseline_6"] > 0 and m["ladr_3"] > 0 and m["ladr_evals_assumed"] == 3
        assert "assumed" in m["assumption"]
        e = r["end_to_end_measured"]["baseline"]
        assert e["seconds"] > 0 and e["evaluations"] == 6 and e["capture_seconds"] == 0.0
        assert set(r["end_to_end_measured"]) == {"baseline", "note"}  # LADR on random weights is no measurement
        e = r["ladr_run_random_weights"]
        assert e["seconds"] > 0 and 1 <= e["evaluations"] <= 6 and e["capture_seconds"] == 0.0
    assert rows["eager"]["logits_dtype"] == "bfloat16"  # the dtype the GPU run uses
    assert rows["onnxruntime"]["export_s"] > 0 and rows["onnxruntime"]["precision"] == "float32"
    assert on_disk["speedup_vs_official"] == {}  # no official row in this run

    summary = latency.gpu_summary(res, out)
    assert [r["backend"] for r in summary["rows"]] == ["eager", "onnxruntime"]
    assert all(r["eval_ms"] > 0 and r["whole_step_ms"] > 0 for r in summary["rows"])


def test_gpu_cli_on_cpu_last_line_is_json(latency, tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = latency.main(["--gpu", "--device", "cpu", "--gpu-model", "tiny", "--resolutions", "64x96",
                       "--prompt-budget", "32", "--gpu-backends", "eager", "--reps", "2", "--warmup", "1",
                       "--e2e-steps", "4", "--threads", "1", "--gpu-out", str(out)])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "latency-gpu" and last["out"] == str(out) and out.is_file()
    assert last["rows"][0]["backend"] == "eager" and last["rows"][0]["eval_ms"] > 0


def test_full_config_is_never_built_on_cpu(latency):
    with pytest.raises(SystemExit, match="refusing"):
        latency.random_model(latency.GPU_MODELS["8b"], torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gives")
def test_gpu_flag_without_cuda_says_so(latency, capsys):
    assert latency.main(["--gpu"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cpu_roofline_peak_is_the_best_gemm_of_the_libraries_in_the_table(latency):
    """A roofline against torch.mm alone put onnxruntime rows at 203% of "peak": onnxruntime's
    GEMM beat torch's. The peak is now the best of both, measured on the same threads."""
    torch.set_num_threads(1)
    peak, peaks = latency.cpu_gemm_peak(threads=1)
    assert set(peaks) == {"torch.mm", "onnxruntime MatMul"}
    assert all(v > 0 for v in peaks.values()) and peak == max(peaks.values())


@pytest.mark.slow
def test_gpu_suite_inductor_block_measurement_on_cpu(latency, tmp_path):
    """The 8B inductor row's code path (one block compiled and timed against the eager block,
    the full model scaled from the eager row), run on the CPU on the micro model."""
    model = latency.random_model(latency.GPU_MODELS["micro"], torch.device("cpu"), torch.float32)
    from ladr_rt.config import ImageSpec
    from ladr_rt.tokens import SequenceLayout

    seq = SequenceLayout(ImageSpec(32, 48, 32), model.cfg.layout)
    with pytest.raises(latency.Scaled) as ei:
        latency.inductor_denoiser(model, seq, torch.device("cpu"), tmp_path, lambda s: None, full=False)
    d = ei.value.data
    assert d["method"].startswith("per-block measurement, scaled") and d["n_layers"] == 1
    assert d["block_eager_s"] > 0 and d["block_inductor_s"] > 0 and d["block_package_bytes"] > 0
    assert d["block_max_abs_diff"] < 1e-4  # fp32: the compiled block computes what the eager block does
