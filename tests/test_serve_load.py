"""bench/serve_load.py end to end at toy size: real `ladr-rt serve` subprocesses on loopback
(the shipped testbed model, 64x64, LADR T=4), two interleaved rounds. Every JSON field the
benchmark promises is there, no request fails, and each request's PNG is the same whichever
mode, batch size and round served it. No timings are asserted (a benchmark, not a test); the
real run is the command in the module docstring of bench/serve_load.py."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
CONFIG_FIELDS = ("mode", "batch", "clients", "rounds", "completed", "truncated", "images_per_s", "images_per_s_rounds",
                 "latency_p50_s", "latency_p95_s", "latency_p99_s", "errors", "errors_by_type", "steps_run",
                 "seconds_per_step", "evaluations_per_image", "round_detail")


@pytest.fixture(scope="module")
def serve_load():
    spec = importlib.util.spec_from_file_location("bench_serve_load", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_serve_load_tiny_run(serve_load, tmp_path, capsys):
    out, png, md = tmp_path / "serve_load.json", tmp_path / "serve_load.png", tmp_path / "RESULTS.md"
    report = serve_load.main(["--batches", "1,2", "--requests", "4", "--rounds", "2", "--warmup", "1", "--steps", "4",
                              "--size", "64", "--threads", "1", "--rss-requests", "6", "--rss-batch", "2", "--rss-chunk", "2",
                              "--json", str(out), "--plot", str(png), "--results", str(md), "--quiet"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # ends with one JSON line
    on_disk = json.loads(out.read_text())
    assert on_disk["configs"] == json.loads(json.dumps(report["configs"]))
    for k in ("command", "date", "machine", "git_commit", "settings", "configs", "continuous_vs_static",
              "images_equal", "images_compared", "errors_total", "truncated_any", "rss"):
        assert k in on_disk, k
    for k in ("cpu", "cores", "torch", "server_torch_threads"):
        assert on_disk["machine"][k], k
    got = {(c["mode"], c["batch"]) for c in on_disk["configs"]}
    assert got == {("sequential", 1), ("static", 1), ("continuous", 1), ("static", 2), ("continuous", 2)}
    for c in on_disk["configs"]:
        for k in CONFIG_FIELDS:
            assert k in c, (c["mode"], c["batch"], k)
        assert c["errors"] == 0 and c["completed"] == 8 and c["rounds"] == 2 and not c["truncated"], c["errors_by_type"]
        assert c["images_per_s"] > 0 and 0 < c["latency_p50_s"] <= c["latency_p95_s"] <= c["latency_p99_s"]
        assert 1 <= c["evaluations_per_image"] <= 4
        for rd in c["round_detail"]:  # the server's own step count: at least the slot-evaluations / B
            assert rd["steps_run"] >= rd["evaluations_total"] / c["batch"] and rd["completed"] == 4
    # the rounds alternate: the mode that went first in round 0 went later in round 1
    st, co = (next(c for c in on_disk["configs"] if c["mode"] == m and c["batch"] == 2) for m in ("static", "continuous"))
    assert [rd["position"] for rd in st["round_detail"]] != [rd["position"] for rd in co["round_detail"]]
    assert on_disk["images_equal"] is True and on_disk["images_compared"] == 4
    assert on_disk["errors_total"] == 0 and last["errors_total"] == 0 and last["images_equal"] is True
    cmp = {r["batch"]: r for r in on_disk["continuous_vs_static"]}
    assert set(cmp) == {1, 2} and cmp[1]["ideal"] == 1.0  # one slot: nothing to gain
    for r in cmp.values():
        assert len(r["rounds"]) == 2 and r["measured"] > 0 and r["ideal"] >= 1 and r["steps_ratio"] > 0
    assert set(last["continuous_vs_static"]) == {"1", "2"}
    rss = on_disk["rss"]
    assert rss["completed"] == 6 and rss["errors"] == 0 and rss["rss_before_mib"] > 0 and rss["batch"] == 2
    assert len(rss["samples"]) == 3 and "second_half_slope_mib_per_1000" in rss
    assert png.stat().st_size > 0 and "<!-- serve-load:start -->" in md.read_text()


def test_serve_load_names_a_server_that_cannot_start(serve_load, tmp_path, capsys):
    """A server that fails to load (here: a model directory that does not exist) ends the run
    with one line naming the command and the server's own error, not a hang or a traceback."""
    with pytest.raises(SystemExit) as e:
        serve_load.main(["--batches", "1", "--modes", "sequential", "--requests", "1", "--size", "64",
                         "--model", str(tmp_path / "missing"), "--json", str(tmp_path / "x.json"), "--quiet"])
    msg = str(e.value.code)
    assert msg.startswith("serve_load: ") and "did not become ready" in msg and "missing" in msg, msg
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("bad", [["--rss-chunk", "0"], ["--clients", "0"], ["--threads", "0"], ["--rss-requests", "-1"],
                                 ["--max-seconds", "nan"], ["--start-timeout", "0"], ["--rounds", "0"]])
def test_serve_load_refuses_bad_options_before_starting_a_server(serve_load, bad, capsys):
    with pytest.raises(SystemExit) as e:
        serve_load.parse_args(bad)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
