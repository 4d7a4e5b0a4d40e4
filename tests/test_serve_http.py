"""The HTTP front end (issue 15 part 3): real HTTP on loopback, uvicorn in a thread on a free port,
the shipped testbed model at its default size (256x256) and few steps."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import socket
import threading
import time

import numpy as np
import pytest

from conftest import import_extra

# Skipped with the reason where the serve extra is missing; a collection error under CI=true.
import_extra("fastapi", "serve")
uvicorn = import_extra("uvicorn", "serve")
httpx = import_extra("httpx", "serve")

from PIL import Image  # noqa: E402

from ladr_rt.config import LadrParams, SamplerConfig  # noqa: E402
from ladr_rt.pipeline import LadrPipeline  # noqa: E402
from ladr_rt.serve import Scheduler  # noqa: E402
from ladr_rt.serve.app import AppConfig, create_app  # noqa: E402

CFG = SamplerConfig(name="ladr", steps=8, temperature=1.0)
KEY = "test-key"
ROUTE = "/v1/images/generations"


@pytest.fixture(scope="module")
def base():
    return LadrPipeline.from_pretrained()  # the shipped model, 256x256


def pipe_like(base, batch):
    """Another pipeline (own slots and buffers) over the base's loaded model."""
    return LadrPipeline(base.denoiser, base.tokenizer, base.vq, base.layout, base.seq.spec, batch, base.default_cfg,
                        base.vocab_size)


class Served:
    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def until(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


@pytest.fixture(scope="module")
def main(base):
    """B = 2, continuous, an API key."""
    sched = Scheduler(pipe_like(base, 2), CFG)
    srv = Served(create_app(sched, AppConfig(api_key=KEY, max_n=4)))
    client = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    yield srv, sched, client
    client.close()
    srv.stop()


def err(r, status, param=None, *words):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["param"] == param, e
    for w in words:
        assert w in e["message"], (w, e["message"])
    return e


def test_images_are_the_solo_runs_at_their_seeds_under_concurrency(main, base):
    srv, sched, client = main
    solo = {s: np.asarray(base("a red circle above a blue square", SamplerConfig(name="ladr", steps=8, seed=s)).images[0])
            for s in (5, 6, 7)}
    out = {}

    def call(seed, n):
        out[seed] = client.post(ROUTE, json={"prompt": "a red circle above a blue square", "seed": seed, "n": n})

    threads = [threading.Thread(target=call, args=a) for a in ((5, 2), (7, 1))]  # 3 images on 2 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, n in ((5, 2), (7, 1)):
        r = out[seed]
        assert r.status_code == 200, r.text
        body = r.json()
        assert abs(body["created"] - time.time()) < 60 and len(body["data"]) == n
        for i, item in enumerate(body["data"]):
            assert item["seed"] == seed + i and 1 <= item["evaluations"] <= 8 and item["seconds"] > 0
            assert item["revised_prompt"] is None
            got = pixels(item)
            assert got.shape == (256, 256, 3)
            assert np.array_equal(got, solo[seed + i]), f"seed {seed + i}: not the solo image"
    assert not np.array_equal(solo[5], solo[6]), "seeds do not change the image (the test would prove nothing)"
    # no seed: a random one, reported, that remakes the image
    r = client.post(ROUTE, json={"prompt": "a red circle above a blue square", "size": "256x256"})
    item = r.json()["data"][0]
    again = client.post(ROUTE, json={"prompt": "a red circle above a blue square", "seed": item["seed"]}).json()
    assert np.array_equal(pixels(item), pixels(again["data"][0]))


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", ["required"]),
    ({"prompt": 3}, "prompt", ["must be a string"]),
    ({"prompt": "   "}, "prompt", ["empty"]),
    ({"prompt": "a red circle " * 40}, "prompt", ["too long", "prompt budget of 64"]),
    ({"prompt": "a", "n": 0}, "n", ["between 1 and 4"]),
    ({"prompt": "a", "n": 5}, "n", ["between 1 and 4"]),
    ({"prompt": "a", "n": True}, "n", ["integer"]),
    ({"prompt": "a", "n": 1.5}, "n", ["integer"]),
    ({"prompt": "a", "size": "512x512"}, "size", ["not served", "256x256"]),
    ({"prompt": "a", "size": "big"}, "size", ["WIDTHxHEIGHT", "256x256"]),
    ({"prompt": "a", "response_format": "url"}, "response_format", ["url' is not supported"]),
    ({"prompt": "a", "response_format": "png"}, "response_format", ["b64_json"]),
    ({"prompt": "a", "seed": -1}, "seed", ["between 0 and"]),
    ({"prompt": "a", "seed": "1"}, "seed", ["integer"]),
    ({"prompt": "a", "steps": 9}, "steps", ["between 1 and 8"]),
    ({"prompt": "a", "steps": 0}, "steps", ["between 1 and 8"]),
    ({"prompt": "a", "cfg": -1}, "cfg", ["finite number > 0"]),
    ({"prompt": "a", "cfg": 0}, "cfg", ["cannot be switched off"]),
    ({"prompt": "a", "sed": 1}, "sed", ["unknown field"]),
])
def test_bad_fields_are_400_naming_the_field(main, body, param, words):
    srv, sched, client = main
    err(client.post(ROUTE, json=body), 400, param, *words)


@pytest.mark.parametrize("raw, param, words", [
    ('{"prompt": "a", "cfg": NaN}', None, ["NaN", "not JSON"]),
    ('{"prompt": "a", "cfg": Infinity}', None, ["Infinity", "not JSON"]),
    ('{"prompt": "a", "cfg": 1e400}', "cfg", ["finite", "inf"]),  # valid JSON that Python reads as inf
    ('{"prompt": "a"', None, ["not JSON"]),
    ('["a"]', None, ["JSON object"]),
])
def test_non_json_and_nan_are_refused(main, raw, param, words):
    srv, sched, client = main
    err(client.post(ROUTE, content=raw), 400, param, *words)


def test_body_too_large_auth_and_routes(main):
    srv, sched, client = main
    err(client.post(ROUTE, json={"prompt": "a" * 70_000}), 413, None, "over 65536 bytes")

    def chunks():  # no Content-Length: refused while reading
        for _ in range(20):
            yield b" " * 8192

    err(client.post(ROUTE, content=chunks()), 413, None, "over 65536 bytes")
    bare = httpx.Client(base_url=srv.url, timeout=10)
    err(bare.post(ROUTE, json={"prompt": "a"}), 401, None, "Bearer")
    err(bare.post(ROUTE, json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}), 401, None, "API key")
    # health and metrics need no key; health names the server's sampler and phase table (CFG's: the paper's)
    assert bare.get("/health").json() == {"status": "ready", "sampler": "ladr",
                                          "ladr": dataclasses.asdict(LadrParams())}
    err(client.get(ROUTE), 405, None)
    err(client.get("/v2/nothing"), 404, None, "POST /v1/images/generations")
    bare.close()


def test_metrics_name_what_they_count(main):
    srv, sched, client = main
    client.post(ROUTE, json={"prompt": "a blue square", "seed": 1})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("ladr_rt_queue_depth 0", "ladr_rt_busy_slots 0", "ladr_rt_slots 2", "ladr_rt_ready 1",
                 'ladr_rt_request_seconds_bucket{le="+Inf"}', "ladr_rt_request_seconds_count",
                 'ladr_rt_image_evaluations_bucket{le="8"}', 'ladr_rt_rejections_total{reason="bad_request"}',
                 'ladr_rt_rejections_total{reason="queue_full"}'):
        assert name in text, name
    images = int(next(ln for ln in text.splitlines() if ln.startswith("ladr_rt_images_total ")).split()[1])
    count = int(next(ln for ln in text.splitlines() if ln.startswith("ladr_rt_image_evaluations_count")).split()[1])
    assert images >= 1 and count == images


def test_loading_is_503_then_ready_without_a_key(base):
    go = threading.Event()

    def factory():
        go.wait(10)
        return Scheduler(pipe_like(base, 1), CFG, mode="sequential")

    srv = Served(create_app(factory))
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        e = err(c.post(ROUTE, json={"prompt": "a red circle"}), 503, None, "loading")
        assert e["code"] == "loading"
        assert c.post(ROUTE, json={"prompt": "a red circle"}).headers["retry-after"] == "1"
        go.set()
        until(lambda: c.get("/health").status_code == 200, what="ready")
        r = c.post(ROUTE, json={"prompt": "a red circle", "seed": 0, "steps": 4})
        assert r.status_code == 200 and r.json()["data"][0]["evaluations"] <= 4
        assert 'ladr_rt_rejections_total{reason="loading"} 2' in c.get("/metrics").text
        c.close()
    finally:
        srv.stop()


def test_queue_full_is_429_and_a_disconnect_frees_its_slot(base):
    """The loop is run by hand (start=False), so the queue and the slot are where the test puts them."""
    sched = Scheduler(pipe_like(base, 1), CFG, mode="sequential", max_queue=1, start=False)
    srv = Served(create_app(sched))
    try:
        c = httpx.Client(base_url=srv.url, timeout=30)
        # A raw client: sends its request, then hangs up mid-run.
        s = socket.create_connection(("127.0.0.1", srv.port))
        body = json.dumps({"prompt": "a red circle", "seed": 0}).encode()
        s.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        until(lambda: sched.waiting == 1, what="the request to queue")
        r = c.post(ROUTE, json={"prompt": "a blue square"})  # the queue (max 1) is full
        e = err(r, 429, None, "queue is full")
        assert e["type"] == "rate_limit_error" and r.headers["retry-after"] == "1"
        assert sched.run_once() and sched.busy == 1  # admitted, one step in
        running = sched._slots[0].future
        s.close()
        until(running.cancelled, what="the disconnect to cancel the request")
        sched.run_once()  # the next step boundary
        assert sched.busy == 0 and sched.cancelled == 1
        # a later request still completes
        got = {}
        t = threading.Thread(target=lambda: got.update(r=c.post(ROUTE, json={"prompt": "a blue square", "seed": 2})))
        t.start()
        until(lambda: sched.waiting == 1, what="the later request to queue")
        sched.run_until_idle()
        t.join(10)
        assert got["r"].status_code == 200 and len(got["r"].json()["data"]) == 1
        assert sched.busy == 0
        text = c.get("/metrics").text
        assert 'ladr_rt_rejections_total{reason="disconnected"} 1' in text
        assert 'ladr_rt_rejections_total{reason="queue_full"} 1' in text
        c.close()
    finally:
        srv.stop()


# ------------------------------------------------------------------ `ladr-rt serve`

def _cli(*args):
    from test_cli import run_cli

    return run_cli("serve", *args)


def _one_line(r, *needles):
    from test_cli import _one_line_error

    _one_line_error(r, *needles)


def test_serve_cli_refuses_bad_options_and_addresses_in_one_line():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        _one_line(_cli("--port", busy.getsockname()[1], "--device", "cpu"), "is in use", "choose another --port")
    finally:
        busy.close()
    _one_line(_cli("--host", "no-such-host.invalid", "--port", 0, "--device", "cpu"), "--host", "not an address")
    _one_line(_cli("--port", 70000, "--device", "cpu"), "--port must be between 0 and 65535")
    _one_line(_cli("--mode", "sequential", "--batch", 2, "--device", "cpu"), "--mode sequential")
    _one_line(_cli("--max-queue", 0, "--device", "cpu"), "--max-queue must be >= 1")
    _one_line(_cli("--steps", 0, "--device", "cpu"), "--steps must be between")
    _one_line(_cli("--ladr", "alpha_refine=2", "--device", "cpu"), "--ladr alpha_refine", "from 0 to 1")
    _one_line(_cli("--sampler", "baseline", "--ladr", "alpha_refine=0.3", "--device", "cpu"), "--sampler baseline",
              "does not use it")


def test_ready_line_names_the_phase_table_so_it_can_be_rerun():
    from ladr_rt.samplers import resolve
    from ladr_rt.serve.server import sampler_line

    table = LadrParams.from_option("tau_refine=0.05,alpha_refine=0.3")
    line = sampler_line(resolve(SamplerConfig(name="ladr", ladr=table), 2.0))
    assert "sampler ladr" in line and "cfg 2.0" in line
    assert LadrParams.from_option(line.split("--ladr ", 1)[1]) == table
    assert "--ladr" not in sampler_line(resolve(SamplerConfig(name="baseline"), 2.0))
    delayed = sampler_line(resolve(SamplerConfig(name="ladr-delayed"), 2.0))
    assert "delayed=true" in delayed  # what ran, not what was typed


def test_package_and_generate_load_without_fastapi_and_serve_says_what_to_install():
    """fastapi blocked from importing (a None in sys.modules) in one fresh interpreter."""
    import subprocess
    import sys

    code = """
import json, sys
sys.modules["fastapi"] = None
import ladr_rt, ladr_rt.serve
from click.testing import CliRunner
from ladr_rt.cli import main
from ladr_rt.pipeline import LadrPipeline
from ladr_rt.serve import Scheduler  # the scheduler is plain Python: only the HTTP layer needs fastapi
rs = [CliRunner().invoke(main, a) for a in (["serve"], ["generate", "--help"])]
print(json.dumps([[r.exit_code, r.stderr] for r in rs]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (serve_rc, serve_err), (gen_rc, gen_err) = json.loads(r.stdout.strip().splitlines()[-1])
    assert serve_rc == 1 and serve_err.strip() == "Error: ladr-rt serve needs fastapi: pip install 'ladr-rt[serve]'"
    assert gen_rc == 0, gen_err  # generate itself imports nothing of the HTTP layer (ladr_rt/serve/app.py)
