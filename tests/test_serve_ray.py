"""Scale-out on Ray Serve (issue 15 part 4). The server is `ladr-rt serve --replicas 2` as a user
runs it: a real process that starts its own local Ray with 2 CPU replicas of the shipped testbed
model; real HTTP on loopback through Ray's proxy. Its images are compared with an in-process
Scheduler's (what the single-process server serves, tests/test_serve_http.py). Ray starts twice
(the server, then a replica that fails to load), ~20 s each on 2 loaded cores."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import import_extra

# The serve extra: skipped with the reason where it is missing (the GPU machine), a collection
# error under CI=true (the CI installs the dev extra, so a missing ray there is a broken CI).
httpx = import_extra("httpx", "serve")
import_extra("ray", "serve", "Ray Serve runs the replicas")
import_extra("fastapi", "serve", "the replicas serve ladr_rt.serve.app")

from ladr_rt.config import SamplerConfig  # noqa: E402
from ladr_rt.pipeline import LadrPipeline  # noqa: E402
from ladr_rt.serve import Scheduler  # noqa: E402
from ladr_rt.serve.app import REPLICA_HEADER, _png_b64, health_body  # noqa: E402
from ladr_rt.serve.server import ScaleOptions, ServeError, ServeOptions  # noqa: E402

# Ray 2.60 declares pydantic fields the deprecated way; its warnings are not this project's.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")]

ROOT = Path(__file__).resolve().parents[1]
ROUTE = "/v1/images/generations"
STEPS, TEMPERATURE, BATCH = 8, 1.0, 2
# (prompt, seed): different prompts and seeds, each image made by whichever replica Ray picks
REQUESTS = [("a red circle above a blue square", 0), ("a red circle above a blue square", 1),
            ("two green triangles", 2), ("a blue square left of a yellow circle", 3), ("a red circle", 4),
            ("a red circle", 5), ("three blue squares", 6), ("a green circle below a red square", 7)]
CLI = [sys.executable, "-m", "ladr_rt.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    """`ladr-rt serve --replicas 2` in its own session (so a signal to it reaches it alone, as
    `kill PID` would), its stdout and stderr in files."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.proc = subprocess.Popen(
                CLI + ["serve", "--replicas", "2", "--port", str(self.port), "--device", "cpu", "--batch", str(BATCH),
                       "--steps", str(STEPS), "--temperature", str(TEMPERATURE)],
                stdout=o, stderr=e, env=ENV, start_new_session=True)

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_ready(self, timeout: float = 180) -> float:
        t0 = time.monotonic()
        while "ready:" not in self.stderr():
            assert self.proc.poll() is None, f"ladr-rt serve --replicas 2 exited: {self.stderr()}"
            assert time.monotonic() - t0 < timeout, f"not ready after {timeout} s: {self.stderr()}"
            time.sleep(0.2)
        return time.monotonic() - t0

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def _reference() -> dict:
    """Each request's b64 PNG from an in-process Scheduler: the single-process server's path.
    One torch thread, as in each replica (1 CPU each here): a float reduction split over a
    different thread count may round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = LadrPipeline.from_pretrained(batch=BATCH)
        with Scheduler(pipe, SamplerConfig(steps=STEPS, temperature=TEMPERATURE)) as sched:
            futs = {(p, s): sched.submit(p, seed=s) for p, s in REQUESTS}
            return {k: _png_b64(f.result(120).image) for k, f in futs.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = RayServer(tmp_path_factory.mktemp("ray-serve"))
    try:
        ref = _reference()  # while Ray and the replicas start
        srv.ready_s = srv.wait_ready()
        yield srv, ref
    finally:
        srv.stop()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_two_replicas_serve_the_single_process_images_and_both_are_used(served):
    srv, ref = served
    got, errors = {}, []

    def call(prompt, seed):
        try:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                got[(prompt, seed)] = c.post(ROUTE, json={"prompt": prompt, "seed": seed})
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(repr(e))

    threads = [threading.Thread(target=call, args=k) for k in REQUESTS]  # 8 at once on 2 x 2 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    replicas = {}
    for key, r in got.items():
        assert r.status_code == 200, (key, r.status_code, r.text)
        (item,) = r.json()["data"]
        assert item["seed"] == key[1] and 1 <= item["evaluations"] <= STEPS
        assert item["b64_json"] == ref[key], f"{key}: not the single-process image"
        replicas.setdefault(r.headers[REPLICA_HEADER], []).append(key)
    assert len(got) == len(REQUESTS)
    assert len(replicas) == 2, f"one replica served everything: {replicas}"
    pix = [_pixels(ref[k]) for k in REQUESTS[:2]]
    assert not np.array_equal(*pix), "seeds do not change the image (the equality would prove nothing)"


def test_health_metrics_and_errors_answer_through_ray(served):
    srv, ref = served
    seen = set()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(12):
            r = c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["sampler"] == "ladr", r.text
            seen.add(r.headers[REPLICA_HEADER])
        assert "ladr_rt_slots 2" in c.get("/metrics").text  # one replica's own: its B
        r = c.post(ROUTE, json={"prompt": "a", "sed": 1})  # the app's own 400, unchanged under Ray
        assert r.status_code == 400 and r.json()["error"]["param"] == "sed"
        # the OpenAI routes and checks of the single-process server (tests/test_serve_openai.py)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["ladr-rt-testbed"]
        r = c.post(ROUTE, json={"prompt": "a", "model": "dall-e-3"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found"
        r = c.get(ROUTE)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"]
        # the same request again is the same image, wherever it lands
        again = c.post(ROUTE, json={"prompt": REQUESTS[2][0], "seed": REQUESTS[2][1]})
        assert again.json()["data"][0]["b64_json"] == ref[REQUESTS[2]]
    assert seen and all(re.fullmatch(r"[a-z0-9]+", s) for s in seen), seen


def test_bad_bodies_are_400_naming_the_field_through_ray(served):
    """Bodies that were 500s (RecursionError, int() of other scripts' digits or of 5000 digits, a
    cfg whose NaN was blamed on the checkpoint) are the app's 400s behind Ray's proxy too."""
    srv, _ = served
    deep = '{"prompt": "x", "user": ' + "[" * 20000 + "]" * 20000 + "}"
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for body, param in [(deep, None), (json.dumps({"prompt": "x", "size": "\u0665\u0661\u0662x256"}), "size"),
                            (json.dumps({"prompt": "x", "size": "9" * 5000 + "x256"}), "size"),
                            (json.dumps({"prompt": "x", "cfg": 1e300}), "cfg")]:
            r = c.post(ROUTE, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (r.status_code, r.text[:300])


def test_sigterm_stops_ray_and_the_replicas_in_one_line(served):
    """Runs last of the server's tests (it stops it)."""
    srv, _ = served
    session = re.search(r"Ray's logs: (\S+?)/logs\)", srv.stderr()).group(1)
    t0 = time.monotonic()
    rc = srv.stop()
    took = time.monotonic() - t0
    err, out = srv.stderr(), srv.out.read_text()
    assert rc == 0, err
    assert "Traceback" not in err + out, err + out
    assert err.strip().splitlines()[-1] == "ladr-rt serve: stopped by SIGTERM", err
    assert out.strip() == "", out  # Ray's shutdown noise kept off the terminal
    assert took < 60, took
    with socket.socket() as s:  # Ray's proxy let go of the port
        s.bind(("127.0.0.1", srv.port))
    left = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and session.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            pass
    assert not left, f"processes of Ray session {session} still running: {left}"
    logs = sorted(Path(session, "logs", "serve").glob("replica_*.log"))
    closed = [p.name for p in logs if "scheduler closed after" in p.read_text()]
    assert len(logs) == 2 and len(closed) == 2, (logs, closed)  # each replica closed its scheduler
    # each replica wrote its access lines (no prompt text) to its log
    texts = [p.read_text() for p in logs]
    assert all(re.search(r"ladr-rt access: \S+ POST /v1/images/generations 200 \S+s n=1", t) for t in texts), logs
    assert not any("blue square" in ln for t in texts for ln in t.splitlines() if "ladr-rt access" in ln)


def test_a_replica_that_fails_to_load_is_one_line_and_an_exit(tmp_path, tiny_ckpt):
    # A missing model directory is refused before Ray starts (its config.json is read first).
    r = subprocess.run(CLI + ["serve", "--replicas", "1", "--model", str(tmp_path / "nowhere"), "--port", "0",
                              "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nowhere' does not exist" in r.stderr and "Ray" not in r.stderr, r.stderr
    # Damaged weights pass that check and fail in the replica.
    model = tmp_path / "m"
    shutil.copytree(tiny_ckpt, model)
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    t0 = time.monotonic()
    r = subprocess.run(CLI + ["serve", "--replicas", "1", "--model", str(model), "--port", "0",
                              "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert errors == [lines[-1]], r.stderr  # progress lines, then one error line
    assert "a replica failed to load the model" in lines[-1] and shard.name in lines[-1], lines[-1]
    assert time.monotonic() - t0 < 150


def test_a_placement_ray_cannot_make_is_one_line_and_an_exit():
    """2 replicas of 8 CPUs on a machine with fewer: Ray would wait for them forever, silently."""
    t0 = time.monotonic()
    r = subprocess.run(CLI + ["serve", "--replicas", "2", "--replica-cpus", str(8 * (os.cpu_count() or 1)), "--port",
                              "0", "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("Error:")] == [lines[-1]], r.stderr
    assert "CPUs" in lines[-1] and "--replica-cpus" in lines[-1], lines[-1]
    assert time.monotonic() - t0 < 150


# ------------------------------------------------------------------ options and the config file (no Ray started)

def _one_line(r, *needles):
    from test_cli import _one_line_error

    _one_line_error(r, *needles)


def _cli(*args):
    from test_cli import run_cli

    return run_cli("serve", "--device", "cpu", *args)


def test_serve_cli_refuses_bad_scale_options_in_one_line(monkeypatch):
    _one_line(_cli("--replicas", 0), "--replicas must be >= 1")
    _one_line(_cli("--autoscale", "4:2"), "MIN 4 is over MAX 2")
    _one_line(_cli("--autoscale", "two"), "--autoscale takes MIN:MAX")
    _one_line(_cli("--autoscale", "0:2"), "MIN must be >= 1")
    _one_line(_cli("--replicas", 5, "--autoscale", "1:4"), "outside --autoscale 1:4")
    _one_line(_cli("--replica-cpus", 1), "add --replicas N")
    _one_line(_cli("--replicas", 1, "--replica-cpus", 0), "--replica-cpus must be > 0")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:  # refused before Ray starts
        _one_line(_cli("--replicas", 2, "--port", busy.getsockname()[1]), "is in use", "choose another --port")
    finally:
        busy.close()
    with pytest.raises(ServeError, match="one GPU of its own"):
        ScaleOptions(replicas=2).validate(ServeOptions(device="cuda:1"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    monkeypatch.delitem(sys.modules, "ladr_rt.serve.ray_serve", raising=False)
    _one_line(_cli("--replicas", 2), "Ray Serve, which is not installed", "pip install 'ladr-rt[serve]'")


def test_config_file_args_carry_the_shutdown_grace_and_run_options():
    from ladr_rt.config import RunOptions
    from ladr_rt.serve.ray_serve import deployment_options, options_from_args

    opts, _ = options_from_args({"device": "cpu", "shutdown_grace": 7, "cuda_graph": "off", "attention": "sdpa"})
    assert opts.shutdown_grace == 7 and opts.run == RunOptions(cuda_graph="off", attention="sdpa")
    # Ray stops a replica after the server's grace, not after a fixed time
    assert deployment_options(opts, ScaleOptions(replicas=1), cluster_cpus=2)["graceful_shutdown_timeout_s"] == 12
    with pytest.raises(ValueError, match="--cuda-graph on needs a CUDA device"):
        options_from_args({"device": "cpu", "cuda_graph": "on"})


def test_deployment_options_split_cpus_and_autoscale_on_the_batch():
    from ladr_rt.serve.ray_serve import deployment_options

    cpu = ServeOptions(device="cpu", batch=4)
    d = deployment_options(cpu, ScaleOptions(replicas=2), cluster_cpus=2)
    assert d["num_replicas"] == 2 and d["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0}
    assert d["max_ongoing_requests"] == 8 and d["max_queued_requests"] == 64 and "autoscaling_config" not in d
    assert d["max_constructor_retry_count"] == 1 and d["backpressure_config"]["status_code"] == 429
    d = deployment_options(cpu, ScaleOptions(autoscale="1:4"), cluster_cpus=2)  # 4 replicas fit on 2 CPUs
    assert d["ray_actor_options"]["num_cpus"] == 0.5 and "num_replicas" not in d
    assert d["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                       "target_ongoing_requests": 4}
    d = deployment_options(cpu, ScaleOptions(replicas=2), cluster_cpus=16)
    assert d["ray_actor_options"]["num_cpus"] == 8.0
    d = deployment_options(ServeOptions(device="cuda", mode="sequential"), ScaleOptions(replicas=3, autoscale="2:8"))
    assert d["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert d["autoscaling_config"]["initial_replicas"] == 3 and d["autoscaling_config"]["target_ongoing_requests"] == 1
    assert d["max_ongoing_requests"] == 2


def test_example_config_parses_and_builds():
    """What `serve run deploy/ray-serve.yaml` does before deploying: Ray's schema, then the
    builder at import_path with the file's args (Ray's own helpers)."""
    import yaml
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from ladr_rt.serve.ray_serve import DEPLOYMENT, app

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text()))
    (spec,) = cfg.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), spec.args)
    assert isinstance(built, Application)
    dep = built._bound_deployment
    assert dep.name == DEPLOYMENT  # the name a config's deployments: section must use
    assert dep.ray_actor_options["num_cpus"] == 1
    auto = dep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 4)
    (opts,) = dep._replica_config.init_args
    assert opts.batch == 4 and opts.sampler.steps == 64 and opts.device in ("cpu", "cuda")
    # What Ray pickles for every replica: options and paths, never weights.
    assert len(dep._replica_config.serialized_init_args) < 10_000
    with pytest.raises(ValueError, match="unknown ladr-rt arg 'bacth'"):
        app({"bacth": 2})
    from ladr_rt.serve.ray_serve import options_from_args

    table = options_from_args({"ladr": "tau_refine=0.05,alpha_refine=0.3"})[0].sampler.ladr
    assert (table.tau_refine, table.alpha_refine) == (0.05, 0.3)
    with pytest.raises(ServeError, match="MIN 3 is over MAX 1"):
        app({"autoscale": "3:1"})


# ------------------------------------------------------------------ the health check's source (no Ray)

class _Die(BaseException):
    """Not an Exception: the scheduler loop's own handler lets it through, so the thread ends."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_a_closed_scheduler_and_a_dead_loop(tiny_ckpt):
    pipe = LadrPipeline.from_pretrained(tiny_ckpt, height=32, width=32, prompt_budget=24, batch=1)
    sched = Scheduler(pipe, SamplerConfig(steps=2), mode="sequential")
    state = {"sched": sched, "error": None, "closing": False}
    assert sched.health() is None and health_body(state)["status"] == "ready"

    def die():
        raise _Die("boom")

    sched.run_once = die
    sched.submit("a red circle", seed=0)
    sched._thread.join(10)
    assert "the scheduler loop died: _Die: boom" in sched.health()
    assert health_body(state) == {"status": "failed", "error": sched.health()}  # what check_health raises on
    sched.close(1)
    assert sched.health() == "the scheduler is closed" and health_body(state) == {"status": "stopping"}
    assert health_body({"sched": None, "error": "model gone", "closing": False}) == {"status": "failed",
                                                                                      "error": "model gone"}
