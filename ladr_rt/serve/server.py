"""``ladr-rt serve``: options, the scheduler factory and the uvicorn run (fastapi/uvicorn are
imported only in ``run``, so this module and the CLI load without the ``serve`` extra)."""
from __future__ import annotations

import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LADR_SAMPLERS, RunOptions, SamplerConfig
from .scheduler import MODES, Scheduler

DEFAULT_BATCH = 4  # eager continuous/static batching; sequential is 1, an engine has its own
SHUTDOWN_GRACE = 30.0  # seconds a SIGTERM leaves requests in flight to finish


class ServeError(ValueError):
    """A bad option or an unusable address: one line for the CLI."""


@dataclass
class ServeOptions:
    model: str | None = None  # None: the shipped testbed model
    engine: str | None = None
    batch: int | None = None  # None: 1 for sequential, the engine's, else DEFAULT_BATCH
    mode: str = "continuous"
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64
    api_key: str | None = None
    device: str = "cpu"  # resolved by the CLI
    dtype: torch.dtype = torch.float32
    sampler: SamplerConfig = SamplerConfig()  # steps: the most a request may ask for
    height: int | None = None
    width: int | None = None
    prompt_budget: int | None = None
    max_n: int = 8
    served_model_name: str | None = None  # the id at /v1/models; None: model_id()'s default
    log_prompts: bool = False  # the access log writes each request's prompt
    run: RunOptions = RunOptions()  # CUDA graphs and attention of the eager model
    shutdown_grace: float = SHUTDOWN_GRACE
    read_timeout: float = 10.0  # seconds for a request body to arrive

    def model_id(self) -> str:
        """The id /v1/models lists and a request's ``model`` must match (when sent): the
        --served-model-name, else the engine's or checkpoint's directory name, else
        ``ladr-rt-testbed`` (the shipped model)."""
        if self.served_model_name:
            return self.served_model_name
        src = self.engine or self.model
        return Path(src).name if src and Path(src).name else "ladr-rt-testbed"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ServeError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.batch is not None and self.batch < 1:
            raise ServeError(f"--batch must be >= 1, got {self.batch}")
        if self.mode == "sequential" and self.batch not in (None, 1):
            raise ServeError(f"--mode sequential runs one request at a time: leave --batch out or give 1, not "
                             f"{self.batch}")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be between 0 and 65535, got {self.port}")
        if self.max_queue < 1:
            raise ServeError(f"--max-queue must be >= 1, got {self.max_queue}")
        from .app import api_key_problem

        problem = api_key_problem(self.api_key)
        if problem is not None:
            raise ServeError(f"--api-key (or LADR_RT_API_KEY) {problem}")
        if not 0 <= self.shutdown_grace <= 3600:  # NaN fails this too
            raise ServeError(f"--shutdown-grace must be between 0 and 3600 seconds, got {self.shutdown_grace}")
        if not 0 < self.read_timeout <= 3600:
            raise ServeError(f"--read-timeout must be > 0 and at most 3600 seconds, got {self.read_timeout}")
        if self.served_model_name is not None and (not self.served_model_name.strip() or
                                                   self.served_model_name != self.served_model_name.strip()):
            raise ServeError(f"--served-model-name {self.served_model_name!r}: give a name without leading or "
                             "trailing spaces, or leave it out")
        for flag, v in (("--height", self.height), ("--width", self.width), ("--prompt-budget", self.prompt_budget)):
            if v is not None and v <= 0:
                raise ServeError(f"{flag} must be positive, got {v}")
        try:
            self.sampler.validate()
        except ValueError as e:
            raise ServeError(str(e)) from None

    def check_shape(self) -> None:
        """What the options ask of the model that its config.json or the engine's manifest can
        answer (size, prompt budget, an engine's batch): checked before the port is bound, so a
        bad value is one line and not a "listening on" followed by a failed load."""
        from ..config import ImageSpec

        try:
            if self.engine is not None:
                from ..engines import check_manifest, read_manifest

                batch = 1 if self.mode == "sequential" else self.batch
                check_manifest(read_manifest(self.engine), height=self.height, width=self.width,
                               prompt_budget=self.prompt_budget, batch=batch, model=self.model)
                return
            from ..checkpoint import read_config

            if self.model is None:
                from ..shipped import model_dir as shipped

                model = shipped()
                if not (model / "config.json").is_file():
                    return  # the load says what is missing
            else:
                model = self.model
            cfg = read_config(model)
            ImageSpec(cfg.default_size[0] if self.height is None else self.height,
                      cfg.default_size[1] if self.width is None else self.width,
                      ImageSpec.prompt_budget if self.prompt_budget is None else self.prompt_budget
                      ).validate(cfg.layout.vq_scale)
        except ValueError as e:  # ConfigError, CheckpointError, EngineError are ValueErrors
            raise ServeError(str(e)) from None

    def scheduler_factory(self):
        """A no-argument callable that loads the pipeline and returns its Scheduler."""

        def load() -> Scheduler:
            from ..pipeline import LadrPipeline

            batch = 1 if self.mode == "sequential" else self.batch
            if self.engine is not None:
                pipe = LadrPipeline.from_engine(self.engine, self.device, self.height, self.width, self.prompt_budget,
                                                batch, model_dir=self.model)
            else:
                pipe = LadrPipeline.from_pretrained(self.model, self.height, self.width, self.prompt_budget,
                                                    dtype=self.dtype, device=self.device,
                                                    batch=batch or DEFAULT_BATCH, options=self.run)
            sched = Scheduler(pipe, self.sampler, mode=self.mode, max_queue=self.max_queue)
            try:
                warm_up(sched)
            except BaseException:
                sched.close(10)
                raise
            return sched

        return load


WARM_UP_PROMPT = "a red circle"
WARM_UP_TIMEOUT_S = 600


def warm_up(sched: Scheduler) -> float:
    """Runs one 1-step request through ``sched`` (step, VQ decode, future) and returns its
    seconds. Called before a server reports ready: a fresh server's first request took 16.9 s
    against ~2 s after, paying one-time costs (first kernels, allocator growth, thread pools)
    that the warm-up pays instead. A model that cannot make this image fails the load."""
    t0 = time.perf_counter()
    try:
        sched.submit(WARM_UP_PROMPT, seed=0, steps=1).result(WARM_UP_TIMEOUT_S)
    except Exception as e:
        raise RuntimeError(f"the warm-up request ({WARM_UP_PROMPT!r}, 1 step) failed: {type(e).__name__}: {e}") from None
    # The warm-up's step paid the one-time costs: as the first sample of the step time it would
    # make a shutdown's drain refuse queued requests that would have finished in the grace.
    sched.forget_step_time()
    return time.perf_counter() - t0


def sampler_line(cfg: SamplerConfig) -> str:
    """The served sampler, with its phase table as `--ladr` takes it (so it can be rerun)."""
    line = f"sampler {cfg.name}, T {cfg.steps}, cfg {cfg.cfg}, temperature {cfg.temperature}"
    return line + (f", --ladr {cfg.ladr.table()}" if cfg.name in LADR_SAMPLERS else "")


@dataclass
class ScaleOptions:
    """Replicas on Ray Serve (ladr_rt/serve/ray_serve.py). Plain data, checked without Ray, so
    the CLI refuses a bad value before importing it. Neither field set: the single-process
    server."""

    replicas: int | None = None  # a fixed count; with autoscale, the count to start with
    autoscale: str | None = None  # "MIN:MAX": Ray adds and removes replicas between the two
    replica_cpus: float | None = None  # Ray CPUs reserved per CPU replica; None: the cluster's CPUs / MAX

    @property
    def enabled(self) -> bool:
        return self.replicas is not None or self.autoscale is not None

    @property
    def bounds(self) -> tuple[int, int] | None:
        """(MIN, MAX) of --autoscale, or None."""
        if self.autoscale is None:
            return None
        lo, sep, hi = str(self.autoscale).partition(":")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise ServeError(f"--autoscale takes MIN:MAX, two whole numbers such as 1:4, got {self.autoscale!r}")
        return int(lo), int(hi)

    @property
    def most(self) -> int:
        """The most replicas that may run at once (what per-replica CPUs are sized for)."""
        b = self.bounds
        return b[1] if b else (self.replicas or 1)

    def validate(self, serve: ServeOptions | None = None) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ServeError(f"--replicas must be >= 1, got {self.replicas}")
        b = self.bounds
        if b is not None:
            lo, hi = b
            if lo < 1:
                # Scale-to-zero would make the next request wait out a model load; not offered.
                raise ServeError(f"--autoscale {self.autoscale}: MIN must be >= 1 (one replica stays up to answer)")
            if lo > hi:
                raise ServeError(f"--autoscale {self.autoscale}: MIN {lo} is over MAX {hi}; give MIN:MAX with MIN <= MAX, "
                                 f"such as {hi}:{lo}")
            if self.replicas is not None and not lo <= self.replicas <= hi:
                raise ServeError(f"--replicas {self.replicas} (the count to start with) is outside --autoscale "
                                 f"{self.autoscale}; give a count between {lo} and {hi}, or leave --replicas out")
        if self.replica_cpus is not None:
            if not self.enabled:
                raise ServeError("--replica-cpus sizes Ray replicas: add --replicas N or --autoscale MIN:MAX, or leave "
                                 "it out")
            if not self.replica_cpus > 0:
                raise ServeError(f"--replica-cpus must be > 0, got {self.replica_cpus}")
        if serve is not None and self.enabled:
            dev = str(serve.device)
            if dev.startswith("cuda:"):
                raise ServeError(f"--device {dev}: on Ray each replica gets one GPU of its own (it sees it as cuda); "
                                 "give --device cuda or auto")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use or a bad host is one line, not
    uvicorn's log and exit."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ServeError(f"--host {host!r} is not an address this machine can listen on ({e.strerror}); use "
                         "127.0.0.1, 0.0.0.0 or one of its interface addresses") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop reuses the port
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = "is in use by another process" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise ServeError(f"--port {port} on {host} {why}; choose another --port (or stop the other server)") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def access_log_to(log):
    """The app's access log lines (logger ``ladr_rt.serve.access``) go to ``log`` meanwhile."""
    import logging

    from .app import ACCESS_LOGGER

    class Lines(logging.Handler):
        def emit(self, record):
            try:
                log(record.getMessage())
            except Exception:  # noqa: BLE001 -- a closed stderr must not fail the request
                self.handleError(record)

    logger, handler = logging.getLogger(ACCESS_LOGGER), Lines(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@dataclass
class Stopped:
    """How ``run`` ended: the signal's name, what the shutdown did, and whether a step was still
    running when the server closed (the process must then leave without waiting for it)."""

    signal: str | None
    summary: str | None = None
    step_running: bool = False


def _one_line_protocol_errors(record: logging.LogRecord) -> bool:
    """uvicorn logs a malformed request (a bad chunk size, a broken header) with the parser's
    traceback under h11; the client's mistake is worth its one warning line, not a traceback."""
    if record.exc_info and str(record.msg).startswith("Invalid HTTP request"):
        record.exc_info, record.exc_text = None, None
    return True


def run(opts: ServeOptions, log=print) -> Stopped:
    """Serves until SIGINT/SIGTERM/SIGHUP; returns how it stopped, or raises ServeError when the
    model fails to load (the server stops then too). On a signal the server stops accepting,
    lets requests that fit in ``opts.shutdown_grace`` finish, and answers the rest 503."""
    import signal
    import threading

    import uvicorn

    from .app import AppConfig, create_app

    opts.check_shape()
    sock = bind(opts.host, opts.port)
    app = create_app(opts.scheduler_factory(), AppConfig(api_key=opts.api_key, max_n=opts.max_n,
                                                         model_name=opts.model_id(), log_prompts=opts.log_prompts,
                                                         body_timeout=opts.read_timeout))
    metrics = app.state.metrics

    class Server(uvicorn.Server):
        stopped_by = None

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = sig
                self.before = dict(metrics.rejections), metrics.images
                app.state.begin_shutdown(opts.shutdown_grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # SIGHUP (a closed terminal, a supervisor's reload) stops the server the same way.
            hup = signal.signal(signal.SIGHUP, self.handle_exit) \
                if threading.current_thread() is threading.main_thread() else None
            # uvicorn re-raises the caught signal after its clean shutdown, which would turn a
            # Ctrl-C into a KeyboardInterrupt traceback or SIGTERM into a kill: the shutdown
            # is already done, so drop it here.
            try:
                with super().capture_signals():
                    for sig in early:  # a signal that came before uvicorn's handlers were in
                        self.handle_exit(sig, None)
                    try:
                        yield
                    finally:
                        getattr(self, "_captured_signals", []).clear()
            finally:
                if hup is not None:
                    signal.signal(signal.SIGHUP, hup)

    # uvicorn's own timeout is a backstop: by the grace's end the scheduler has answered every
    # request, so the connections close before it and no handler is cancelled (which would be
    # a bare 500 and a traceback each).
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=opts.shutdown_grace + 5,
                                   lifespan="on", timeout_keep_alive=5))
    logging.getLogger("uvicorn.error").addFilter(_one_line_protocol_errors)

    def watch_load():
        loader = None
        while loader is None and not server.should_exit:
            loader = getattr(app.state, "loader", None)
            threading.Event().wait(0.05)
        if loader is not None:
            loader.join()
        if app.state.ladr["error"] is not None:
            server.should_exit = True
        elif app.state.ladr["sched"] is not None and not app.state.ladr["closing"]:  # else: stopped while loading
            host, port = sock.getsockname()[:2]
            s = app.state.ladr["sched"]
            spec = s.pipe.seq.spec
            log(f"ready: http://{host}:{port}/v1/images/generations ({spec.width}x{spec.height}, batch "
                f"{s.pipe.batch}, {opts.mode}, {s.pipe.denoiser.name} on {s.pipe.denoiser.device}; "
                f"{sampler_line(s.cfg)})")

    # From the "listening" line on, a signal stops the server cleanly, even one that arrives
    # before uvicorn installs its own handlers (it is replayed to them).
    early: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    before = {sig: signal.signal(sig, lambda n, f: early.append(n))
              for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
    try:
        host, port = sock.getsockname()[:2]
        log(f"listening on http://{host}:{port} (loading the model; /health says when it is ready)")
        threading.Thread(target=watch_load, daemon=True).start()
        with access_log_to(log):
            server.run(sockets=[sock])
    finally:
        for sig, prev in before.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    if app.state.ladr["error"] is not None:
        raise ServeError(f"the model failed to load: {app.state.ladr['error']}")
    if not server.stopped_by:
        return Stopped(None)
    sched = app.state.ladr["sched"]
    (rej, images) = getattr(server, "before", ({}, 0))
    refused = metrics.rejections.get("shutting_down", 0) - rej.get("shutting_down", 0)
    cut = metrics.rejections.get("disconnected", 0) - rej.get("disconnected", 0)
    parts = [f"{metrics.images - images} image(s) finished within the {opts.shutdown_grace:g} s grace"]
    if refused:
        parts.append(f"{refused} request(s) answered 503 shutting_down with Retry-After")
    if cut:
        parts.append(f"{cut} client(s) hung up first")
    running = sched is not None and sched._thread is not None and sched._thread.is_alive()
    if running:
        parts.append("a step was still running and was abandoned")
    loader = getattr(app.state, "loader", None)
    loading = loader is not None and loader.is_alive()
    if loading:
        parts = ["the model was still loading and was abandoned"]
    # Either thread is inside torch: the caller must leave without tearing the interpreter down.
    return Stopped(signal.Signals(server.stopped_by).name, "; ".join(parts), running or loading)
