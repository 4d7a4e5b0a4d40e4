"""The images API as an OpenAI client sees it: the `openai` package and raw HTTP against the app
on loopback (tests/test_serve_http.py's server and fixtures), then `ladr-rt serve` as a process
(warm-up before ready, the access log, --served-model-name). docs/images-api.md is what these check."""
from __future__ import annotations

import base64
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_serve_http import Served, base, err, pipe_like, until  # noqa: F401 -- base: the module's fixture

import httpx  # noqa: E402 -- after test_serve_http, which skips the module without the serve extra
from conftest import import_extra  # noqa: E402

openai = import_extra("openai", "dev", "the tests drive the API through OpenAI's client")
from PIL import Image  # noqa: E402

from ladr_rt.config import SamplerConfig  # noqa: E402
from ladr_rt.serve import Scheduler  # noqa: E402
from ladr_rt.serve.app import ACCESS_LOGGER, AppConfig, create_app, encode_image, health_body  # noqa: E402
from ladr_rt.serve.server import ServeOptions  # noqa: E402

KEY, MODEL, STEPS = "k", "testbed-under-test", 4
ROUTE = "/v1/images/generations"
PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def api(base):  # noqa: F811
    cfg = AppConfig(api_key=KEY, max_n=2, model_name=MODEL)
    srv = Served(create_app(Scheduler(pipe_like(base, 2), SamplerConfig(name="ladr", steps=STEPS)), cfg))
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    raw = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield srv, oa, raw, cfg
    raw.close()
    oa.close()
    srv.stop()


def _image(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_openai_client_gets_each_output_format_at_its_compression(api):
    srv, oa, raw, cfg = api
    got = {}
    for fmt, comp in (("png", None), ("jpeg", 95), ("jpeg", 5), ("webp", 90)):
        extra = {} if comp is None else {"output_compression": comp}
        r = oa.images.generate(model=MODEL, prompt=PROMPT, size="auto", quality="hd", style="vivid", n=1,
                               response_format="b64_json", output_format=fmt, extra_body={"seed": 3}, **extra)
        assert r.output_format == fmt and r.size == "256x256"
        (item,) = r.data
        assert item.seed == 3  # the server's extension fields come through the client
        got[fmt, comp] = base64.b64decode(item.b64_json)
    magic = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF"}
    for (fmt, comp), data in got.items():
        assert data.startswith(magic[fmt]), (fmt, data[:12])
        im = Image.open(io.BytesIO(data))
        assert im.format == fmt.upper() and im.size == (256, 256)
    png = np.asarray(Image.open(io.BytesIO(got["png", None])).convert("RGB")).astype(int)
    # The same image (same seed) in each format: close to the PNG's pixels, lossy by the compression
    for key, bound in ((("jpeg", 95), 4), (("webp", 90), 8)):
        lossy = np.asarray(Image.open(io.BytesIO(got[key])).convert("RGB")).astype(int)
        assert np.abs(lossy - png).mean() < bound, key
    assert len(got["jpeg", 5]) < len(got["jpeg", 95]) / 2, "output_compression did not reach the encoder"
    # the default (no output_format) is the PNG the server always made, bytes and all
    plain = raw.post(ROUTE, json={"prompt": PROMPT, "seed": 3, "size": "256x256"}).json()
    assert base64.b64decode(plain["data"][0]["b64_json"]) == got["png", None] and plain["output_format"] == "png"


def test_encode_image_quality_orders_sizes_and_png_ignores_it():
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("jpeg", "webp"):
        sizes = [len(encode_image(im, fmt, q)) for q in (0, 50, 100)]
        assert sizes[0] < sizes[1] < sizes[2], (fmt, sizes)
    assert encode_image(im, "png", 0) == encode_image(im, "png", 100)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(im, "png")))), np.asarray(im))
    with pytest.raises(ValueError, match="choose one of png, jpeg, webp"):
        encode_image(im, "gif")


def test_models_list_and_retrieve_in_openai_shape_and_an_unknown_model_is_refused(api):
    srv, oa, raw, cfg = api
    listed = oa.models.list()
    assert [m.id for m in listed.data] == [MODEL]
    m = oa.models.retrieve(MODEL)
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "ladr-rt") and abs(m.created - time.time()) < 3600
    body = raw.get("/v1/models").json()
    assert body == {"object": "list", "data": [{"id": MODEL, "object": "model", "created": m.created,
                                                "owned_by": "ladr-rt"}]}
    with pytest.raises(openai.NotFoundError) as e:
        oa.models.retrieve("dall-e-3")
    assert e.value.code == "model_not_found" and MODEL in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oa.images.generate(model="dall-e-3", prompt=PROMPT)
    assert (e.value.code, e.value.param) == ("model_not_found", "model") and repr(MODEL) in e.value.message
    e = err(raw.post(ROUTE, json={"prompt": PROMPT, "model": "gpt-image-1"}), 400, "model", "/v1/models", MODEL)
    assert e["code"] == "model_not_found"
    bare = httpx.Client(base_url=srv.url, timeout=10)
    for path in ("/v1/models", f"/v1/models/{MODEL}"):  # the key guards every /v1 route
        assert err(bare.get(path), 401, None, "Bearer")["code"] == "invalid_api_key"
    bare.close()


def test_a_405_names_the_allowed_methods_and_has_a_code(api):
    srv, oa, raw, cfg = api
    r = raw.get(ROUTE)
    assert err(r, 405, None, "Method Not Allowed")["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    r = raw.post("/v1/models", json={})
    assert err(r, 405, None)["code"] == "method_not_allowed" and "GET" in r.headers["allow"].split(", ")
    assert err(raw.get("/v1/nothing"), 404, None, "GET /v1/models")["code"] == "not_found"


@pytest.mark.parametrize("fields, param, code, words", [
    ({"output_format": "gif"}, "output_format", "unsupported", ["still images"]),
    ({"output_format": "bmp"}, "output_format", "invalid_value", ["png, jpeg, webp"]),
    ({"output_format": "PNG"}, "output_format", "invalid_value", ["png, jpeg, webp"]),
    ({"output_format": ["png"]}, "output_format", "invalid_value", ["png, jpeg, webp"]),
    ({"output_compression": 101}, "output_compression", "out_of_range", ["between 0 and 100"]),
    ({"output_compression": True}, "output_compression", "invalid_type", ["integer"]),
    ({"quality": "ultra"}, "quality", "invalid_value", ["auto, low"]),
    ({"style": 3}, "style", "invalid_value", ["vivid, natural"]),
    ({"background": "transparent"}, "background", "unsupported", ["alpha"]),
    ({"moderation": "none"}, "moderation", "invalid_value", ["auto, low"]),
    ({"stream": True}, "stream", "unsupported", ["stream true"]),
    ({"stream": "no"}, "stream", "invalid_type", ["true or false"]),
    ({"partial_images": 2}, "partial_images", "unsupported", ["streaming"]),
    ({"safety_identifier": 7}, "safety_identifier", "invalid_type", ["string"]),
    ({"size": "1024x1024"}, "size", "unsupported_size", ["256x256"]),
    ({"size": "AUTO"}, "size", "invalid_value", ["WIDTHxHEIGHT"]),
])
def test_openai_values_this_server_cannot_honour_are_400_naming_the_field(api, fields, param, code, words):
    srv, oa, raw, cfg = api
    assert err(raw.post(ROUTE, json={"prompt": PROMPT, **fields}), 400, param, *words)["code"] == code


def test_access_log_is_one_line_per_request_without_the_prompt_unless_asked(api, caplog):
    srv, oa, raw, cfg = api
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)

    def lines():
        return [r.getMessage() for r in caplog.records if r.name == ACCESS_LOGGER]

    secret = "two green triangles"
    assert raw.post(ROUTE, json={"prompt": secret, "n": 2, "seed": 1, "steps": 1}).status_code == 200
    assert raw.post(ROUTE, json={"prompt": secret, "n": 0}).status_code == 400
    assert raw.get("/health").status_code == 200
    until(lambda: len(lines()) == 3, what="three access lines")
    ok, bad, health = lines()
    assert re.fullmatch(r"127\.0\.0\.1 POST /v1/images/generations 200 \d+\.\d{3}s n=2", ok), ok
    assert re.fullmatch(r"127\.0\.0\.1 POST /v1/images/generations 400 \d+\.\d{3}s n=-", bad), bad
    assert re.fullmatch(r"127\.0\.0\.1 GET /health 200 \d+\.\d{3}s n=-", health), health
    assert all("green" not in ln for ln in lines())
    cfg.log_prompts = True
    try:
        assert raw.post(ROUTE, json={"prompt": 'a "red"\ncircle', "seed": 1, "steps": 1}).status_code == 200
        until(lambda: len(lines()) == 4, what="the fourth access line")
    finally:
        cfg.log_prompts = False
    assert lines()[3].endswith(r' n=1 prompt="a \"red\"\ncircle"'), lines()[3]  # escaped: still one line


def test_the_served_scheduler_is_warm_before_it_is_returned(monkeypatch):
    opts = ServeOptions(device="cpu", mode="sequential", sampler=SamplerConfig(steps=STEPS))
    sched = opts.scheduler_factory()()
    try:
        assert sched.steps_run == 1 and sched.busy == 0 and sched.waiting == 0 and sched.health() is None
        # the warm-up's cold step is not kept as the step time a shutdown's drain estimates from
        assert sched._step_s is None
    finally:
        sched.close(10)
    import ladr_rt.serve.server as server

    monkeypatch.setattr(server, "WARM_UP_PROMPT", " ")  # a request the scheduler refuses
    with pytest.raises(RuntimeError, match=r"the warm-up request \(' ', 1 step\) failed: PromptError"):
        opts.scheduler_factory()()
    assert opts.model_id() == "ladr-rt-testbed"
    assert ServeOptions(model="/m/Lumina-DiMOO/").model_id() == "Lumina-DiMOO"
    assert ServeOptions(engine="engines/dimoo-512", served_model_name="x").model_id() == "x"


@pytest.mark.slow
def test_ladr_rt_serve_warms_up_before_ready_and_logs_each_request(tmp_path):
    """`ladr-rt serve` as a user starts it: ~10 s on 2 loaded cores (interpreter, torch, model)."""
    errf = tmp_path / "stderr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(errf, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "ladr_rt.cli", "serve", "--port", "0", "--device", "cpu",
                                 "--mode", "sequential", "--steps", str(STEPS), "--served-model-name", "tb"],
                                stdout=subprocess.DEVNULL, stderr=e, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "ready:" not in errf.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, errf.read_text()
            time.sleep(0.1)
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", errf.read_text()).group(1)
        url = f"http://127.0.0.1:{port}"
        metrics = httpx.get(url + "/metrics").text  # the first request of all: the warm-up step is already run
        assert "ladr_rt_steps_total 1\n" in metrics and "ladr_rt_images_total 0\n" in metrics, metrics
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as oa:
            assert [m.id for m in oa.models.list().data] == ["tb"]
            r = oa.images.generate(model="tb", prompt="two green triangles", output_format="webp")
        assert _image(r.data[0].b64_json).format == "WEBP"
        until(lambda: "POST /v1/images/generations 200" in errf.read_text(), what="the access line")
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    text = errf.read_text()
    assert rc == 0, text
    access = [ln for ln in text.splitlines() if re.match(r"ladr-rt serve: 127\.0\.0\.1 (GET|POST) /", ln)]
    assert [ln.split()[3:6] for ln in access] == [["GET", "/metrics", "200"], ["GET", "/v1/models", "200"],
                                                   ["POST", "/v1/images/generations", "200"]], text
    assert access[2].endswith(" n=1") and "green" not in text
    assert text.index("ready:") < text.index("GET /metrics")


def test_a_blank_served_model_name_is_refused_before_anything_loads():
    from ladr_rt.serve.server import ServeError

    for name in (" ", " tb"):
        with pytest.raises(ServeError, match="--served-model-name .* leading or trailing spaces"):
            ServeOptions(served_model_name=name).validate()
    ServeOptions(served_model_name="Alpha-VLLM/Lumina-DiMOO").validate()


def test_health_says_stopping_while_the_server_drains():
    """During a shutdown's grace every new request gets 503: /health (and Ray's check_health)
    must say so too, not "ready"."""
    opts = ServeOptions(device="cpu", mode="sequential", sampler=SamplerConfig(steps=STEPS))
    sched = opts.scheduler_factory()()
    state = {"sched": sched, "error": None, "closing": False}
    try:
        assert health_body(state)["status"] == "ready"
        sched.drain(5)
        assert health_body(state) == {"status": "stopping"}
    finally:
        sched.close(5)
