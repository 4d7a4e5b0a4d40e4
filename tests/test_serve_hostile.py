"""`ladr-rt serve` under hostile clients, signals and faults: each test runs real `ladr-rt serve`
processes on 127.0.0.1 (ephemeral ports) with the tiny checkpoint, and real signals. A step of the
tiny model at 512x512 takes ~1 s on one thread here (0.05 s would still do), so a request of the
server's 64 steps holds its slot long enough for clients to queue behind it; requests that only
need an answer ask for 1 step."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import import_extra  # noqa: E402

import_extra("fastapi", "serve")
import_extra("uvicorn", "serve")

from serve_proc import (ACCESS_LINE, CLI, ROOT, ServeProc, answer, env, error_of, hang_up_behind_the_head,  # noqa: E402
                        problems)

SLOW = ["--mode", "sequential", "--height", "512", "--width", "512", "--steps", "64"]


def _refused_before_listening(runs):
    """``runs``: [(argv after `serve`, extra env, words)], started at once; each must exit 1 with
    one line naming the problem, before binding a port."""
    procs = [(subprocess.Popen(CLI + ["serve", "--port", "0", "--device", "cpu", *a], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env(**e), cwd=ROOT), a, words)
             for a, e, words in runs]
    for p, a, words in procs:
        out, err = p.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1, (a, p.returncode, err)
        assert lines[0].startswith("Error: ") and "listening" not in err and "Traceback" not in err, (a, err)
        for w in words:
            assert w in lines[0], (a, w, lines[0])


def test_api_key_rule_holds_for_every_source(tiny_ckpt):
    """An empty LADR_RT_API_KEY (a secret that did not render) used to start an open server; a
    key with spaces or non-ASCII characters one that no client header could match."""
    m = ["--model", str(tiny_ckpt)]
    _refused_before_listening([
        (m, {"LADR_RT_API_KEY": ""}, ["LADR_RT_API_KEY", "is empty"]),
        (m, {"LADR_RT_API_KEY": " secret"}, ["a space"]),
        (m + ["--api-key", "s\u00e9cret"], {}, ["non-ASCII", "'\u00e9'"]),
        (m + ["--api-key", "a\tb"], {}, ["whitespace '\\t'"]),
    ])
    from ladr_rt.serve.app import AppConfig
    from ladr_rt.serve.server import ServeError, ServeOptions

    with pytest.raises(ServeError, match="is empty"):  # what a Ray Serve config file's args become
        ServeOptions(api_key="").validate()
    with pytest.raises(ValueError, match="holds a space"):
        AppConfig(api_key="key ")


def test_options_that_need_no_model_are_refused_before_binding(tiny_ckpt):
    m = ["--model", str(tiny_ckpt)]
    _refused_before_listening([
        (m + ["--height", "100"], {}, ["--height 100", "multiple of 16"]),
        (m + ["--prompt-budget", "100000"], {}, ["--prompt-budget", "at most"]),
        (m + ["--shutdown-grace", "nan"], {}, ["--shutdown-grace"]),
        (m + ["--read-timeout", "0"], {}, ["--read-timeout"]),
    ])


@pytest.mark.slow
def test_hostile_clients_bodies_and_truncated_weights(tiny_ckpt, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_ckpt, model)
    s = ServeProc("--model", model, *SLOW, "--max-queue", "2", "--read-timeout", "2").wait_ready()
    try:
        # Weights truncated in place under the running server: it must not depend on its files.
        for f in model.rglob("*.safetensors"):
            os.truncate(f, 0)
        status, _, body = s.request({"prompt": "a red circle", "seed": 1, "steps": 1})
        assert status == 200 and len(json.loads(body)["data"]) == 1, body[:300]

        # A queued client that hangs up while not at the head of the queue leaves it, and the
        # next client fits where it was: no spurious 429.
        a, b, d = hang_up_behind_the_head(s)

        # n over the queue can never fit: 400 naming the limit, not a 429 forever.
        e = error_of(*s.request({"prompt": "x", "n": 3}))
        assert e["param"] == "n" and "--max-queue" in e["message"] and "2" in e["message"], e

        # Bodies that were 500s: each a 400 naming its field.
        deep = b'{"prompt": "x", "user": ' + b"[" * 20000 + b"]" * 20000 + b"}"
        for raw, param in [(deep, None), ({"prompt": "x", "size": "\u0665\u0661\u0662x512"}, "size"),
                           ({"prompt": "x", "size": "9" * 5000 + "x512"}, "size"),
                           ({"prompt": "x", "cfg": 1e300}, "cfg")]:
            status, h, body = s.request(raw)
            e = error_of(status, h, body)
            assert status == 400 and e["param"] == param, (status, body[:200])

        # A stalled upload gets 408 after --read-timeout; a malformed chunk size a 400.
        t0 = time.monotonic()
        status, h, body = s.request(b'{"prompt": "x"', headers={"Content-Length": "100"}, content_length=False)
        assert status == 408 and error_of(status, h, body)["code"] == "body_timeout", body
        assert 1.5 < time.monotonic() - t0 < 10
        status, _, _ = s.request(b"zz\r\nabc\r\n0\r\n\r\n", headers={"Transfer-Encoding": "chunked"},
                                 content_length=False)
        assert status == 400
        # Hang-ups everywhere: running (a), queued (b, d).
        for k in (a, b, d):
            k.close()
        s.until(lambda: s.metric("ladr_rt_busy_slots") == 0 and s.metric("ladr_rt_queue_depth") == 0,
                timeout=30, what="the hung-up requests to be freed")
    finally:
        rc = s.stop()
    assert rc == 0, s.stderr
    assert problems(s.stderr) == [], s.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_drains_what_fits_and_answers_the_rest_503(tiny_ckpt, sig):
    s = ServeProc("--model", tiny_ckpt, *SLOW, "--max-queue", "8", "--shutdown-grace", "3").wait_ready()
    try:
        assert s.request({"prompt": "warm up", "seed": 0, "steps": 1})[0] == 200  # the step time is known
        socks = [s.send({"prompt": f"p{i}", "seed": i}) for i in range(5)]
        s.until(lambda: s.metric("ladr_rt_queue_depth") == 4, what="4 queued")
    except BaseException:
        s.stop(signal.SIGKILL)
        raise
    t0 = time.monotonic()
    s.p.send_signal(sig)
    got: dict[int, tuple] = {}

    def read(i, k):
        k.settimeout(30)
        st, h, body = answer(k)
        got[i] = (st, h, body, time.monotonic() - t0)

    readers = [threading.Thread(target=read, args=(i, k)) for i, k in enumerate(socks)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(40)
    rc = s.wait(60)
    took = time.monotonic() - t0
    assert rc == 0, s.stderr
    assert sorted(got) == list(range(5)), (got, s.stderr)
    refused = [i for i, (st, *_) in got.items() if st == 503]
    assert refused and all(got[i][0] in (200, 503) for i in got), got
    for i in refused:
        st, h, body, when = got[i]
        e = error_of(st, h, body)
        assert e["code"] == "shutting_down" and e["type"] == "server_error" and h["retry-after"] == "1", (h, e)
        assert when < 3 + 2, when  # within the grace, not a hang
    # The queued ones (64 steps each, behind the running one) cannot fit in 3 s: told at once.
    assert sum(got[i][3] < 1.5 for i in refused) >= 3, got
    assert took < 30, took
    # One access line per request (the server's access log), and besides them one line per cause:
    # listening, ready, and the shutdown's summary -- not a line per refused client.
    access = [ln for ln in s.stderr.strip().splitlines() if ACCESS_LINE.match(ln)]
    lines = [ln for ln in s.stderr.strip().splitlines() if not ACCESS_LINE.match(ln)]
    assert sum(" POST /v1/images/generations 503 " in ln for ln in access) == len(refused), access
    assert lines[-1].startswith(f"ladr-rt serve: stopped by {sig.name}: ") and "503" in lines[-1], lines
    assert len(lines) == 3 and problems(s.stderr) == [], s.stderr


# `ladr-rt` whose evaluations, after the warm-up's one, each spend ~30 s in one C call that
# releases the GIL, as one torch op of a huge size does: a step that outlasts any grace, whatever
# the machine's speed (a real large size made the test depend on how fast this machine steps).
SLOW_AFTER_WARM_UP = """
import hashlib, sys
import ladr_rt.denoiser as d
real, calls = d.EagerDenoiser.__call__, []
def slow(self, *a):
    calls.append(1)
    if len(calls) > 1:
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000_000)
    return real(self, *a)
d.EagerDenoiser.__call__ = slow
from ladr_rt.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigterm_during_a_long_step_exits_cleanly(tiny_ckpt):
    """A step of tens of seconds still running when the grace ends: the client gets a 503 and the
    process exits 0, where it used to abort ("terminate called without an active exception",
    SIGABRT) tearing the interpreter down under the running step."""
    s = ServeProc("--model", tiny_ckpt, "--mode", "sequential", "--height", "64", "--width", "64",
                  "--steps", "20", "--shutdown-grace", "1",
                  cli=[sys.executable, "-c", SLOW_AFTER_WARM_UP]).wait_ready()
    k = s.send({"prompt": "x"})
    s.until(lambda: s.metric("ladr_rt_busy_slots") == 1, what="the request to run")
    time.sleep(0.5)
    t0 = time.monotonic()
    s.p.send_signal(signal.SIGTERM)
    k.settimeout(30)
    st, h, body = answer(k)
    assert st == 503 and error_of(st, h, body)["code"] == "shutting_down" and h["retry-after"] == "1"
    rc = s.wait(60)
    assert rc == 0, (rc, s.stderr)
    assert time.monotonic() - t0 < 20
    assert "step was still running" in s.stderr.splitlines()[-1] and problems(s.stderr) == [], s.stderr


@pytest.mark.slow
def test_sigterm_while_the_model_loads_is_one_line(tiny_ckpt):
    s = ServeProc("--model", tiny_ckpt, "--height", "64", "--width", "64")
    deadline = time.monotonic() + 120
    while s.port is None:
        assert s.p.poll() is None and time.monotonic() < deadline, s.stderr
        time.sleep(0.01)
    rc = s.stop(timeout=60)
    assert rc == 0 and problems(s.stderr) == [], s.stderr
    assert s.stderr.splitlines()[-1].startswith("ladr-rt serve: stopped by SIGTERM"), s.stderr


def test_a_malformed_request_logs_one_warning_line_not_a_traceback():
    """uvicorn's h11 protocol logs the parser's traceback with its warning (httptools does not)."""
    import logging

    from ladr_rt.serve.server import _one_line_protocol_errors

    try:
        raise ValueError("bad chunk size")
    except ValueError:
        import sys

        rec = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.", (),
                                sys.exc_info())
    assert _one_line_protocol_errors(rec) and rec.exc_info is None
    assert logging.Formatter().format(rec) == "Invalid HTTP request received."
