"""bench/serve_load.py end to end at toy size (the shipped testbed model, 64x64, LADR T=4):
every JSON field the benchmark promises is there, no request fails, and each request's image
is the same whichever mode and batch size served it. No timings are asserted (a benchmark,
not a test); the real run is the command in the module docstring of bench/serve_load.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
CONFIG_FIELDS = ("mode", "batch", "clients", "completed", "submitted", "truncated", "wall_s", "images_per_s",
                 "latency_p50_s", "latency_p95_s", "latency_p99_s", "errors", "errors_by_type", "steps_run",
                 "evaluations_total", "evaluations_per_image", "per_request")


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_serve_load_tiny_run(serve_load, tmp_path, capsys):
    out, png, md = tmp_path / "serve_load.json", tmp_path / "serve_load.png", tmp_path / "RESULTS.md"
    report = serve_load.main(["--batches", "1,2", "--requests", "4", "--warmup", "1", "--steps", "4", "--size", "64",
                              "--threads", "1", "--rss-requests", "4", "--rss-batch", "2", "--json", str(out),
                              "--plot", str(png), "--results", str(md), "--quiet"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # ends with one JSON line
    on_disk = json.loads(out.read_text())
    assert on_disk["configs"] == json.loads(json.dumps(report["configs"]))
    for k in ("command", "date", "machine", "git_commit", "settings", "configs", "continuous_vs_static",
              "images_equal_across_modes", "images_compared", "errors_total", "truncated_any", "rss"):
        assert k in on_disk, k
    for k in ("cpu", "cores", "torch", "torch_threads"):
        assert on_disk["machine"][k], k
    got = {(c["mode"], c["batch"]) for c in on_disk["configs"]}
    assert got == {("sequential", 1), ("static", 1), ("continuous", 1), ("static", 2), ("continuous", 2)}
    for c in on_disk["configs"]:
        for k in CONFIG_FIELDS:
            assert k in c, (c["mode"], c["batch"], k)
        assert c["errors"] == 0 and c["completed"] == 4 and not c["truncated"], c["errors_by_type"]
        assert c["images_per_s"] > 0 and 0 < c["latency_p50_s"] <= c["latency_p95_s"] <= c["latency_p99_s"]
        assert 1 <= c["evaluations_per_image"] <= 4 and c["steps_run"] >= c["evaluations_total"] / c["batch"]
    assert on_disk["images_equal_across_modes"] is True and on_disk["images_compared"] == 4
    assert on_disk["errors_total"] == 0 and last["errors_total"] == 0 and last["images_equal_across_modes"] is True
    # static's batches, in the order it ran them, cover every request once; its steps are their maxima
    st = next(c for c in on_disk["configs"] if c["mode"] == "static" and c["batch"] == 2)
    assert sorted(i for b in st["static_batches"] for i in b) == [0, 1, 2, 3]
    assert all(1 <= len(b) <= 2 for b in st["static_batches"])
    assert st["ideal"]["steps_equal_sum_of_batch_max"] and st["ideal"]["ideal"] >= 1
    cmp = {r["batch"]: r for r in on_disk["continuous_vs_static"]}
    assert set(cmp) == {1, 2} and cmp[1]["ideal"] == 1.0 and all(r["measured"] > 0 for r in cmp.values())
    assert set(last["continuous_vs_static"]) == {"1", "2"}
    rss = on_disk["rss"]
    assert rss["completed"] == 4 and rss["errors"] == 0 and rss["rss_before_mib"] > 0 and "growth_mib" in rss
    assert png.stat().st_size > 0 and "<!-- serve-load:start -->" in md.read_text()
