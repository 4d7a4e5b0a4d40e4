"""An HTTP front end over one Scheduler: the OpenAI Images API shape (``POST /v1/images/generations``,
``GET /v1/models``), ``GET /health`` and ``GET /metrics`` (Prometheus text). docs/images-api.md lists
the fields taken, honoured and ignored.

    app = create_app(lambda: Scheduler(LadrPipeline.from_pretrained(batch=4), SamplerConfig(steps=64)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

A factory is called in a background thread once the server is up, so the port answers (503,
``{"status": "loading"}``) while a large model loads; a ready Scheduler may be passed instead.
The request body is parsed here, by hand, so that every refusal names its field (OpenAI's error
shape: ``{"error": {"message", "type", "param", "code"}}``) and NaN/Infinity, which Python's json
would accept, are refused. The endpoint awaits the scheduler's concurrent Future through
an asyncio future (``_bridge``; the event loop never blocks on a step) and watches the connection
meanwhile: a client that goes away cancels its requests, which frees their slots at the next step.

Needs the ``serve`` extra (fastapi, uvicorn); ``import ladr_rt`` and ``generate`` do not.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import hmac
import io
import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..config import MAX_SEED, MAX_STEPS
from ..tokens import PromptError, PromptTooLong
from .scheduler import QueueFull, Scheduler, SchedulerClosed

ROUTE = "/v1/images/generations"
MODELS_ROUTE = "/v1/models"
# What OpenAI's Images API (and its `openai` client) may send beyond the fields above; each is
# checked (a value this server cannot honour is refused, never dropped) in _parse_openai.
OPENAI_FIELDS = ("output_format", "output_compression", "quality", "style", "background", "moderation", "stream",
                 "partial_images", "safety_identifier")
FIELDS = ("prompt", "n", "size", "response_format", "seed", "steps", "cfg", "model", "user", *OPENAI_FIELDS)
# A random seed (no "seed" in the request) is drawn below 2**31 so that seed + n - 1 and any
# client's int32 seed field hold it; it is reported per image, so the image can be remade.
RANDOM_SEED_BOUND = 2**31
# Guidance past this only saturates the image, and far past it the logits overflow to NaN (a
# failure the server would otherwise blame on the checkpoint).
MAX_CFG = 100.0
MAX_SIDE_DIGITS = 5  # a 'size' side longer than this is not a size any server makes


def api_key_problem(key: str | None) -> str | None:
    """Why ``key`` cannot be the server's API key, or None. One rule for every source of the key
    (--api-key, LADR_RT_API_KEY, a Ray Serve config's args, AppConfig): it is refused at start,
    never normalised, because an empty key would mean no authentication and a key with spaces or
    non-ASCII characters could never be matched by a client's header."""
    if key is None:
        return None
    if not key:
        return "is empty (an unset deployment secret?); give a key, or leave the option and LADR_RT_API_KEY unset " \
               "for no authentication"
    bad = next((c for c in key if not "!" <= c <= "~"), None)
    if bad is not None:
        what = ("a space" if bad == " " else f"the whitespace {bad!r}" if bad.isspace() else
                "a control character" if ord(bad) < 32 or ord(bad) == 127 else f"the non-ASCII character {bad!r}")
        return f"holds {what}, which a client's 'Authorization: Bearer' header cannot carry reliably (it is trimmed, " \
               "split or re-encoded on the way): use printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
    return None


@dataclass
class AppConfig:
    api_key: str | None = None  # None: no auth; else every /v1 request needs "Authorization: Bearer KEY"
    max_n: int = 8  # images per request
    max_body: int = 64 * 1024  # bytes; a prompt is a few hundred
    retry_after: int = 1  # seconds, the Retry-After of a 429 / 503 when no latency is known yet
    model_name: str = "ladr-rt"
    # Set by a Ray Serve replica (ladr_rt/serve/ray_serve.py): every response then carries
    # "x-ladr-replica: <id>", so a client can tell which replica answered. None: no header.
    replica: str | None = None
    # The access log (logger ACCESS_LOGGER, one line per request) names method, path, status,
    # latency and images; a prompt is a user's text, so it is written only when this is set.
    log_prompts: bool = False
    body_timeout: float = 10.0  # seconds for the whole request body to arrive; a stalled upload gets 408

    def __post_init__(self):
        problem = api_key_problem(self.api_key)
        if problem is not None:
            raise ValueError(f"the API key {problem}")


REPLICA_HEADER = "x-ladr-replica"


class _ReplicaHeader:
    """Pure ASGI (not BaseHTTPMiddleware, which wraps ``receive`` and would hide the client's
    http.disconnect from the handler that watches for it)."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode("latin-1"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_tagged)


ACCESS_LOGGER = "ladr_rt.serve.access"


class _AccessLog:
    """One line per HTTP request on logger ACCESS_LOGGER: client, method, path, status, latency
    and, for an image request that was parsed, its n (and its prompt when AppConfig.log_prompts).
    The handler leaves n and prompt in the request's state. Pure ASGI, as _ReplicaHeader."""

    def __init__(self, app):
        self.app, self.log = app, logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), []

        async def send_seen(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            # No response started: the app raised, and Starlette's outer handler answers 500.
            state = scope.get("state") or {}
            client = scope.get("client")
            n = state.get("ladr_n")
            line = (f"{client[0] if client else '-'} {scope['method']} {scope['path']} "
                    f"{status[0] if status else 500} {time.perf_counter() - t0:.3f}s n={'-' if n is None else n}")
            if "ladr_prompt" in state:
                line += f" prompt={json.dumps(state['ladr_prompt'])}"  # quoted and escaped: one line whatever it holds
            self.log.info(line)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None, reason: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers, self.reason = headers or {}, reason

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
EVAL_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REASONS = ("bad_request", "unauthorized", "too_large", "queue_full", "loading", "disconnected", "shutting_down",
           "failed")


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)  # first bucket whose bound >= v ("le")
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Prometheus text format, by hand (no extra dependency). Updated on the event loop's thread."""

    def __init__(self):
        self.latency = Histogram(LATENCY_BUCKETS)
        self.evaluations = Histogram(EVAL_BUCKETS)
        self.images = 0
        self.rejections = dict.fromkeys(REASONS, 0)
        self._lock = threading.Lock()

    def reject(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def render(self, sched: Scheduler | None, ready: bool) -> str:
        p = "ladr_rt_"
        g = [(f"{p}ready", "gauge", "1 once the model is loaded", int(ready)),
             (f"{p}queue_depth", "gauge", "requests waiting for a slot", sched.waiting if sched else 0),
             (f"{p}busy_slots", "gauge", "slots running a request", sched.busy if sched else 0),
             (f"{p}slots", "gauge", "the pipeline's batch B", sched.pipe.batch if sched else 0),
             (f"{p}steps_total", "counter", "batch steps run (one evaluation of all B slots each)",
              sched.steps_run if sched else 0),
             (f"{p}images_total", "counter", "images returned", self.images)]
        out = []
        for name, kind, help_, v in g:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
        with self._lock:
            rej = dict(self.rejections)
            lat, ev = self.latency.lines(f"{p}request_seconds"), self.evaluations.lines(f"{p}image_evaluations")
        out += [f"# HELP {p}rejections_total requests refused or abandoned, by reason", f"# TYPE {p}rejections_total counter"]
        out += [f'{p}rejections_total{{reason="{r}"}} {n}' for r, n in rej.items()]
        out += [f"# HELP {p}request_seconds successful image requests, arrival to response",
                f"# TYPE {p}request_seconds histogram", *lat,
                f"# HELP {p}image_evaluations denoiser evaluations per image", f"# TYPE {p}image_evaluations histogram",
                *ev]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- request parsing


def _refuse_constant(name: str):
    raise ApiError(400, f"the body holds {name}, which is not JSON; send finite numbers", code="invalid_json")


def _int(body: dict, key: str, lo: int, hi: int, default):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{key}' must be an integer, got {json.dumps(v)}", key, "invalid_type")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}", key, "out_of_range")
    return v


def parse_request(raw: bytes, sched: Scheduler, cfg: AppConfig) -> dict:
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except ApiError:
        raise
    except RecursionError:
        raise ApiError(400, "the body nests arrays or objects too deeply; send a flat JSON object with a 'prompt'",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON ({e}); send a JSON object with a 'prompt'", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:  # a typo ("sed") or an unsupported OpenAI field ("quality") would otherwise be silently ignored
        raise ApiError(400, f"unknown field {unknown[0]!r}; this server takes {', '.join(FIELDS)}", unknown[0],
                       "unknown_parameter")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' is required and must be a string" if prompt is None else
                       f"'prompt' must be a string, got {json.dumps(prompt)[:40]}", "prompt",
                       "missing" if prompt is None else "invalid_type")
    if not prompt.strip():
        raise ApiError(400, "'prompt' is empty; describe the image to generate", "prompt", "empty")
    for key in ("model", "user"):  # OpenAI fields accepted for client compatibility; one model per server
        if body.get(key) is not None and not isinstance(body[key], str):
            raise ApiError(400, f"'{key}' must be a string", key, "invalid_type")
    _check_model(body.get("model"), cfg)
    n = _int(body, "n", 1, cfg.max_n, 1)
    if n > sched.max_queue:  # a 429 would tell the client to retry a request that can never fit
        raise ApiError(400, f"'n' {n} is over this server's queue of {sched.max_queue} requests (--max-queue), so it "
                       f"could never be taken; ask for at most {sched.max_queue} images per request", "n",
                       "out_of_range")
    fmt = body.get("response_format", "b64_json")
    if fmt == "url":
        raise ApiError(400, "response_format 'url' is not supported (this server keeps no files); use 'b64_json'",
                       "response_format", "unsupported")
    if fmt != "b64_json":
        raise ApiError(400, f"'response_format' must be 'b64_json', got {json.dumps(fmt)[:40]}", "response_format",
                       "invalid_value")
    spec = sched.pipe.seq.spec
    served = f"{spec.width}x{spec.height}"
    size = body.get("size")
    if size is not None and size != "auto":  # OpenAI's "auto": the model's choice, here the one served size
        # isascii: str.isdigit also takes other scripts' digits, which int() then refuses
        ok = isinstance(size, str) and size.count("x") == 1 and all(
            p.isascii() and p.isdigit() and len(p) <= MAX_SIDE_DIGITS for p in size.split("x"))
        if not ok:
            raise ApiError(400, f"'size' must be 'WIDTHxHEIGHT' such as {served!r}, got {json.dumps(size)[:40]}",
                           "size", "invalid_value")
        w, h = map(int, size.split("x"))
        if (w, h) != (spec.width, spec.height):
            raise ApiError(400, f"size {size} is not served; this server makes {served} images only (one size per "
                           "pipeline: restart it with --width/--height)", "size", "unsupported_size")
    seed = _int(body, "seed", 0, MAX_SEED - (n - 1), None)  # images use seed .. seed + n - 1
    if seed is None:
        seed = secrets.randbelow(RANDOM_SEED_BOUND)
    top = sched.cfg.steps
    steps = _int(body, "steps", 1, min(top, MAX_STEPS), None)
    guidance = body.get("cfg")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise ApiError(400, f"'cfg' must be a number, got {json.dumps(guidance)[:40]}", "cfg", "invalid_type")
        guiding = sched.cfg.cfg > 0
        if not math.isfinite(guidance) or guidance < 0 or guidance > MAX_CFG or (guidance > 0) != guiding:
            want = f"a finite number > 0 and at most {MAX_CFG:g}" if guiding else "0 (this server runs without guidance)"
            raise ApiError(400, f"'cfg' must be {want}, got {guidance}" +
                           (" (guidance cannot be switched off per request)" if guiding and guidance == 0 else ""),
                           "cfg", "out_of_range")
        guidance = float(guidance)
    return {"prompt": prompt, "n": n, "seed": seed, "steps": steps, "cfg": guidance, "size": served,
            **_parse_openai(body)}


def _check_model(model, cfg: AppConfig) -> None:
    if model is not None and model != cfg.model_name:
        raise ApiError(400, f"model {model!r} is not served here; this server serves {cfg.model_name!r} (GET "
                       f"{MODELS_ROUTE}); send that or leave 'model' out", "model", "model_not_found")


# OpenAI's values for the fields this server takes and ignores: anything else is refused, so a
# typo is not silently dropped. Neither changes the image: there is no quality setting beyond
# `steps`, and no style conditioning in the model.
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd")
STYLES = ("vivid", "natural")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_COMPRESSION = 100  # OpenAI's default: the least lossy jpeg/webp


def _choice(body: dict, key: str, allowed, refused: dict | None = None):
    v = body.get(key)
    if v is None:
        return None
    if refused and isinstance(v, str) and v in refused:
        raise ApiError(400, f"{key} {json.dumps(v)} is not supported: {refused[v]}", key, "unsupported")
    if not isinstance(v, str) or v not in allowed:
        raise ApiError(400, f"'{key}' must be one of {', '.join(allowed)}, got {json.dumps(v)[:40]}", key,
                       "invalid_value")
    return v


def _parse_openai(body: dict) -> dict:
    """The OpenAI-only fields: the output encoding (honoured) and the rest (checked, then ignored
    or refused when they ask for what this server cannot do)."""
    fmt = _choice(body, "output_format", tuple(OUTPUT_FORMATS),
                  {"gif": "the model makes still images; use png, jpeg or webp",
                   "svg": "the model makes raster images; use png, jpeg or webp"}) or "png"
    compression = _int(body, "output_compression", 0, 100, None)
    if compression is None:
        compression = DEFAULT_COMPRESSION
    _choice(body, "quality", QUALITIES)
    _choice(body, "style", STYLES)
    _choice(body, "background", ("auto", "opaque"),
            {"transparent": "the model's images have no alpha channel; use 'opaque' or 'auto'"})
    _choice(body, "moderation", ("auto", "low"))
    if body.get("safety_identifier") is not None and not isinstance(body["safety_identifier"], str):
        raise ApiError(400, "'safety_identifier' must be a string", "safety_identifier", "invalid_type")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {json.dumps(stream)[:40]}", "stream", "invalid_type")
    if stream:
        raise ApiError(400, "stream true is not supported: this server answers once every image is made; send "
                       "false or leave it out", "stream", "unsupported")
    if _int(body, "partial_images", 0, 3, 0):
        raise ApiError(400, "partial_images needs streaming, which this server does not do; send 0 or leave it out",
                       "partial_images", "unsupported")
    return {"output_format": fmt, "output_compression": compression}


def encode_image(image, output_format: str = "png", compression: int = DEFAULT_COMPRESSION) -> bytes:
    """``image`` (PIL) as ``output_format`` bytes. ``compression`` is OpenAI's output_compression,
    0-100, used as the jpeg/webp quality (100: least lossy); a PNG is lossless and the same
    bytes whatever it says."""
    buf = io.BytesIO()
    if output_format == "png":
        image.save(buf, format="PNG")
    elif output_format in OUTPUT_FORMATS:
        image.convert("RGB").save(buf, format=OUTPUT_FORMATS[output_format], quality=compression)
    else:
        raise ValueError(f"output_format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    return buf.getvalue()


def _png_b64(image) -> str:
    return base64.b64encode(encode_image(image, "png")).decode("ascii")


def _b64(image, req: dict) -> str:
    return base64.b64encode(encode_image(image, req["output_format"], req["output_compression"])).decode("ascii")


# ---------------------------------------------------------------------------------------------- the app


def create_app(scheduler, config: AppConfig | None = None) -> FastAPI:
    """``scheduler``: a ready ``Scheduler``, or a no-argument factory returning one (called in a
    background thread after startup; the app answers 503 until it returns). The app closes the
    scheduler at shutdown."""
    cfg = config or AppConfig()
    metrics = Metrics()
    state = {"sched": scheduler if isinstance(scheduler, Scheduler) else None, "error": None, "closing": False}
    factory = None if state["sched"] is not None else scheduler
    if factory is not None and not callable(factory):
        raise TypeError("create_app takes a Scheduler or a no-argument callable returning one")

    def load() -> None:
        try:
            s = factory()
            if not isinstance(s, Scheduler):
                raise TypeError(f"the scheduler factory returned {type(s).__name__}, not a Scheduler")
        except BaseException as e:  # noqa: BLE001 -- reported by /health and the CLI, not lost in a thread
            state["error"] = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            return
        state["sched"] = s
        if state["closing"]:  # shut down while loading
            s.close()

    async def lifespan(app):
        state["loop"] = asyncio.get_running_loop()
        state["stopping"] = asyncio.Event()
        if factory is not None:
            app.state.loader = threading.Thread(target=load, name="ladr-rt-load", daemon=True)
            app.state.loader.start()
        yield
        state["closing"] = True
        if state["sched"] is not None:
            # After a drain the requests are settled; a step still running (minutes, on a large
            # size) is not waited for past a moment: the server exits around it.
            await asyncio.to_thread(state["sched"].close, 1 if state["sched"].draining else 30)

    def begin_shutdown(grace: float) -> int:
        """Called from the signal handler (any thread): stop taking requests, let what fits in
        ``grace`` seconds finish, fail the rest with 503 (at once for a waiting request that
        cannot fit, at the deadline for the others), and cut body uploads still arriving.
        Returns how many waiting requests were refused at once."""
        state["closing"] = True
        loop, stopping = state.get("loop"), state.get("stopping")
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop is already closed
                pass
        sched = state["sched"]
        return sched.drain(grace) if sched is not None else 0

    app = FastAPI(title="ladr-rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if cfg.replica is not None:
        app.add_middleware(_ReplicaHeader, value=cfg.replica)
    app.add_middleware(_AccessLog)  # the outermost: its latency covers every other layer
    created = int(time.time())  # the served model's "created" in /v1/models: when this server made it
    app.state.ladr = state
    app.state.begin_shutdown = begin_shutdown
    app.state.metrics = metrics
    app.state.config = cfg

    def not_ready() -> ApiError:
        if state["error"] is not None:
            return ApiError(503, f"the model failed to load: {state['error']}", type_="server_error",
                            code="load_failed", reason="failed")
        return ApiError(503, "the model is still loading; retry shortly", type_="server_error", code="loading",
                        headers={"Retry-After": str(cfg.retry_after)}, reason="loading")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        metrics.reject(e.reason)
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):  # 404 / 405 in the same error shape
        # A 405 keeps Starlette's Allow header (the methods the path takes), as HTTP asks.
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}; the API is POST {ROUTE} "
                        f"and GET {MODELS_ROUTE}", type_="invalid_request_error", code=code,
                        headers=getattr(e, "headers", None)).response()

    @app.get("/health")
    async def health():
        body = health_body(state)
        return body if body["status"] == "ready" else JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(state["sched"], state["sched"] is not None),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "ladr-rt"}

    @app.get(MODELS_ROUTE)
    async def models(request: Request):
        _authorize(request, cfg)
        return {"object": "list", "data": [model_card()]}

    @app.get(MODELS_ROUTE + "/{model_id:path}")
    async def model(request: Request, model_id: str):
        _authorize(request, cfg)
        if model_id != cfg.model_name:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {cfg.model_name!r}",
                           "model", "model_not_found")
        return model_card()

    @app.post(ROUTE)
    async def generations(request: Request):
        t0 = time.perf_counter()
        _authorize(request, cfg)
        raw = await _read_body(request, cfg.max_body, cfg.body_timeout, state.get("stopping"))
        sched = state["sched"]
        if sched is None:
            raise not_ready()
        req = parse_request(raw, sched, cfg)
        request.state.ladr_n = req["n"]  # for the access log
        if cfg.log_prompts:
            request.state.ladr_prompt = req["prompt"]
        futs = [sched.submit(req["prompt"], seed=req["seed"] + i, steps=req["steps"], cfg=req["cfg"])
                for i in range(req["n"])]
        for f in futs:
            if f.done() and f.exception() is not None:
                for g in futs:
                    g.cancel()
                raise _submit_error(f.exception(), sched, cfg)
        results = await _await_or_cancel(request, futs)
        data = []
        for i, r in enumerate(results):
            data.append({"b64_json": await asyncio.to_thread(_b64, r.image, req), "revised_prompt": None,
                         "seed": req["seed"] + i, "evaluations": r.evaluations,
                         "seconds": round(r.run_seconds, 6), "queued_seconds": round(r.queued_seconds, 6)})
            metrics.evaluations.observe(r.evaluations)
        metrics.images += len(data)
        metrics.latency.observe(time.perf_counter() - t0)
        return {"created": int(time.time()), "data": data, "output_format": req["output_format"], "size": req["size"]}

    return app


def _authorize(request: Request, cfg: AppConfig) -> None:
    if cfg.api_key is not None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>' (the server's "
                           "--api-key or LADR_RT_API_KEY)", type_="authentication_error", code="invalid_api_key",
                           reason="unauthorized")


def health_body(state: dict) -> dict:
    """/health's answer, from the app's state (``app.state.ladr``); a Ray Serve replica's
    check_health reads the same, so the probe and Ray agree."""
    sched = state["sched"]
    if sched is None:
        return {"status": "failed", "error": state["error"]} if state["error"] else {"status": "loading"}
    if state["closing"] or sched.draining:  # new requests get 503 now: probes must not see "ready"
        return {"status": "stopping"}
    problem = sched.health()
    if problem is None:
        # the server's sampler and LADR phase table (one per server: `serve --ladr`), for a client
        # that wants to know which variant made its images
        return {"status": "ready", "sampler": sched.cfg.name, "ladr": sched.cfg.phase_table()}
    # A closed scheduler is a server going down; a dead loop would leave requests hanging.
    return {"status": "stopping"} if state["closing"] or sched.closed else {"status": "failed", "error": problem}


async def _read_body(request: Request, cap: int, timeout: float, stopping: asyncio.Event | None = None) -> bytes:
    """The body, within ``timeout`` seconds in all (a stalled upload would hold its connection,
    and a shutdown, for as long as the client likes); cut at once when the server begins to
    shut down (it would be refused then anyway)."""
    too_large = ApiError(413, f"the request body is over {cap} bytes; a prompt needs far less", code="body_too_large",
                         reason="too_large", headers={"Connection": "close"})
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and len(length) < 20 and int(length) > cap:
        raise too_large  # refused before reading it
    chunks, size = [], 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stream = request.stream().__aiter__()  # a chunked body has no length up front
    stop = asyncio.ensure_future(stopping.wait()) if stopping is not None else None
    try:
        while True:
            nxt = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait({nxt} | ({stop} if stop else set()), timeout=max(0.0, deadline - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                if stop is not None and stop.done():
                    raise ApiError(503, "the server is shutting down; retry on another server or once it is back",
                                   type_="server_error", code="shutting_down", reason="shutting_down",
                                   headers={"Retry-After": "1", "Connection": "close"})
                raise ApiError(408, f"the request body did not arrive within {timeout:g} s; send the whole body at "
                               "once", code="body_timeout", headers={"Connection": "close"})
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                break
            except ClientDisconnect:  # the client hung up mid-upload: nobody to answer, nothing to log
                raise ApiError(499, "the client closed the connection during its upload", code="client_closed",
                               reason="disconnected") from None
            size += len(chunk)
            if size > cap:
                raise too_large
            chunks.append(chunk)
    finally:
        if stop is not None:
            stop.cancel()
    return b"".join(chunks)


def _submit_error(e: BaseException, sched: Scheduler, cfg: AppConfig) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, f"{e}", type_="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(cfg.retry_after)}, reason="queue_full")
    if isinstance(e, SchedulerClosed):
        return _shutting_down(cfg.retry_after)
    if isinstance(e, PromptTooLong):
        budget = sched.pipe.seq.spec.prompt_budget
        return ApiError(400, f"'prompt' is too long: {str(e).split(', over')[0].split(' is ', 1)[-1]}, over this "
                        f"server's prompt budget of {budget} tokens; shorten it (or restart the server with "
                        "--prompt-budget)", "prompt", "prompt_too_long")
    if isinstance(e, PromptError):
        return ApiError(400, str(e), "prompt", "invalid_prompt")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}", type_="server_error", reason="failed")


async def _await_or_cancel(request: Request, futs) -> list:
    """The results of ``futs``; if the client disconnects first, every future is cancelled
    (their slots free at the next step) and the handler gives up."""
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(asyncio.gather(*(_bridge(f, loop) for f in futs)))

    async def gone():
        # The body was read, so the next ASGI message is http.disconnect (client gone) and
        # nothing else: this waits for it without polling.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({waiting, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        gone_first = not waiting.done()
        if gone_first:  # the client went away (or the server is stopping this handler)
            for f in futs:
                f.cancel()
            waiting.cancel()
            # The gather may already hold its children's CancelledError; read, so asyncio does
            # not log "exception was never retrieved" for every hang-up.
            waiting.add_done_callback(lambda w: w.cancelled() or w.exception())
    if gone_first:
        # Nobody reads this answer; it is raised so the exception handler counts the rejection.
        raise ApiError(499, "the client closed the connection; its requests were cancelled", code="client_closed",
                       reason="disconnected")
    try:
        return waiting.result()
    except BaseException as e:  # noqa: BLE001 -- one image failed: the request's others are dropped too
        for f in futs:
            f.cancel()
        raise _run_error(e) from None


def _bridge(fut, loop) -> asyncio.Future:
    """An asyncio future that takes ``fut``'s outcome. ``asyncio.wrap_future`` would chain the two
    both ways, a reference cycle that keeps every finished image alive until the cyclic GC
    runs (rarely, in a process holding a model): the server's RSS grew with it. Here only
    ``fut`` points at the asyncio side; cancelling goes to ``fut`` directly (_await_or_cancel)."""
    af = loop.create_future()

    def done(f):
        try:
            loop.call_soon_threadsafe(_copy_outcome, f, af)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody waits
            pass

    fut.add_done_callback(done)
    return af


def _copy_outcome(f, af: asyncio.Future) -> None:
    if af.done():
        return
    if f.cancelled():
        af.cancel()
    elif f.exception() is not None:
        af.set_exception(f.exception())
    else:
        af.set_result(f.result())


def _shutting_down(retry_after: int, message: str = "the server is shutting down") -> ApiError:
    return ApiError(503, f"{message}; retry on another replica or once it is back", type_="server_error",
                    code="shutting_down", headers={"Retry-After": str(retry_after)}, reason="shutting_down")


def _run_error(e: BaseException) -> ApiError:
    if isinstance(e, SchedulerClosed):
        return _shutting_down(1, "the server shut down before the image was made")
    return ApiError(500, f"{type(e).__name__}: {e}", type_="server_error", code="generation_failed", reason="failed")
