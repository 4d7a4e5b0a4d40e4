"""Scale-out on Ray Serve: the single-process server's FastAPI app (``create_app``) as a Ray Serve
deployment, one replica per GPU or per CPU process, each with its own pipeline and Scheduler.

    ladr-rt serve --replicas 2                       # a local Ray on this machine
    ladr-rt serve --autoscale 1:4
    serve run deploy/ray-serve.yaml                  # Ray's CLI: import_path ladr_rt.serve.ray_serve:app

Ray routes requests across replicas, starts/restarts/autoscales them and runs the HTTP proxy;
inside a replica the step-level batching is the Scheduler's, as in the single-process server.
A replica loads its model in its constructor, so Ray routes to it only once it can serve (no
"loading" 503s from a new replica during a scale-up); ``check_health`` reads the same state as
``/health``. Only paths and options cross to the replicas (``ServeOptions`` is pickled by Ray),
never weights. Needs the ``serve`` extra (``ray[serve]``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal

import torch
from ray import serve

from ..config import LadrParams, RunOptions, SamplerConfig
from .app import ACCESS_LOGGER, AppConfig, create_app, health_body
from .server import DEFAULT_BATCH, ScaleOptions, ServeError, ServeOptions, bind

APP_NAME = "ladr-rt"
DEPLOYMENT = "LadrReplica"
# Ray's graceful stop: in-flight requests get this long, then the replica's lifespan closes the
# scheduler. It covers the app's own 30 s close, as in the single-process server.
SHUTDOWN_MARGIN_S = 5


class ReplicaLoadError(RuntimeError):
    """A replica could not build its pipeline; the message is one line for the CLI."""


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()  # the app is built per replica by __serve_build_asgi_app__, around its own scheduler
class LadrReplica:
    async def __init__(self, opts: ServeOptions):
        import ray

        # Ray reserved num_cpus for this process; more torch threads than that would fight the
        # other replicas on the same cores (OpenMP spin-waits make that far worse than linear).
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, math.floor(cpus)))
        self.replica = serve.get_replica_context().replica_tag
        # Under Ray the queue bound is Ray's (max_queued_requests = --max-queue, at the proxy):
        # a replica holds at most max_ongoing requests of up to max_n images, so its own queue
        # is sized to never refuse what Ray sent it.
        try:
            opts = dataclasses.replace(opts, max_queue=max(opts.max_queue, max_ongoing(served_batch(opts)) * opts.max_n))
            # Off the replica's event loop: Ray's own calls to the replica stay answered meanwhile.
            sched = await asyncio.to_thread(opts.scheduler_factory())
        except Exception as e:  # noqa: BLE001 -- one line through Ray's deploy status to the CLI
            raise ReplicaLoadError(_one_line(e)) from None
        # The same app as `ladr-rt serve`; its lifespan (run by Ray in the replica) closes the
        # scheduler when Ray stops the replica.
        self._ladr_app = create_app(sched, AppConfig(api_key=opts.api_key, max_n=opts.max_n, replica=self.replica,
                                                     model_name=opts.model_id(), log_prompts=opts.log_prompts,
                                                     body_timeout=opts.read_timeout))
        _access_log_to_replica_log()

    def __serve_build_asgi_app__(self):
        return self._ladr_app

    def __del__(self):
        # Ray runs the app's lifespan shutdown (which closes the scheduler) just before this;
        # closing here too covers a replica whose app never started. The line in the replica's
        # log is what tests/test_serve_ray.py looks for after a SIGTERM.
        app = getattr(self, "_ladr_app", None)
        sched = app.state.ladr["sched"] if app is not None else None
        if sched is not None:
            if not sched.closed:
                sched.close(30)
            logging.getLogger("ray.serve").info(f"ladr-rt replica {self.replica}: scheduler closed after "
                                                f"{sched.steps_run} steps")

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes Ray replace the replica."""
        body = health_body(self._ladr_app.state.ladr)
        if body["status"] not in ("ready", "stopping"):
            raise RuntimeError(f"replica {self.replica}: {body.get('error') or body['status']}")


class _ToServeLog(logging.Handler):
    def emit(self, record):
        logging.getLogger("ray.serve").info(f"ladr-rt access: {record.getMessage()}")


def _access_log_to_replica_log() -> None:
    """The app's access lines go to Ray's replica log (logs/serve/replica_*.log), beside Ray's own."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(h, _ToServeLog) for h in logger.handlers):
        logger.addHandler(_ToServeLog(logging.INFO))
        logger.setLevel(logging.INFO)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(e, ValueError) and msg else f"{type(e).__name__}: {msg}"


# ---------------------------------------------------------------------------------------------- building


def served_batch(opts: ServeOptions) -> int:
    """The replica's B, known before any replica loads: what the routing limits are sized from."""
    if opts.mode == "sequential":
        return 1
    if opts.batch is not None:
        return opts.batch
    if opts.engine is not None:
        from ..engines.manifest import read_manifest

        try:
            return int(read_manifest(opts.engine)["build_args"]["batch"])
        except ValueError as e:
            raise ServeError(str(e)) from None
    return DEFAULT_BATCH


def max_ongoing(batch: int) -> int:
    """Requests Ray sends a replica at once: B into slots and up to B more waiting, enough to
    start the next at a step boundary, few enough that Ray keeps the rest and sends them to
    whichever replica frees a slot first."""
    return 2 * batch


def deployment_options(opts: ServeOptions, scale: ScaleOptions, cluster_cpus: float | None = None) -> dict:
    """Ray's per-deployment options. ``cluster_cpus``: the CPUs of the cluster the CLI started, so
    CPU replicas split them; None (a config file on some cluster): one CPU each unless
    ``replica_cpus`` says. A config file's ``deployments:`` section overrides any of these."""
    b = served_batch(opts)
    gpu = str(opts.device).startswith("cuda")
    if scale.replica_cpus is not None:
        cpus = scale.replica_cpus
    elif gpu or not cluster_cpus:
        cpus = 1.0
    else:
        # Whole CPUs where they go round (torch threads = the replica's CPUs); a share of one
        # otherwise, so every replica still fits and runs one thread.
        share = cluster_cpus / scale.most
        cpus = float(math.floor(share)) if share >= 1 else share
    out = {
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": 1 if gpu else 0},
        "max_ongoing_requests": max_ongoing(b),
        # Requests beyond that wait in Ray's proxy, bounded like the single-process queue.
        "max_queued_requests": opts.max_queue,
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        # A model that fails to load fails the same way again (bad path, bad checkpoint, OOM):
        # fail the deploy at once so the CLI can say why, instead of Ray's 3 tries per replica.
        "max_constructor_retry_count": 1,
        # Ray stops a replica after this long: the server's grace for requests in flight, plus a
        # few seconds for the replica's own close.
        "graceful_shutdown_timeout_s": opts.shutdown_grace + SHUTDOWN_MARGIN_S,
        "health_check_period_s": 5,
    }
    bounds = scale.bounds
    if bounds is not None:
        lo, hi = bounds
        # Scale up once the average replica has all B slots busy (Ray counts requests in flight).
        out["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                     "initial_replicas": scale.replicas or lo, "target_ongoing_requests": b}
    else:
        out["num_replicas"] = scale.replicas or 1
    return out


def build(opts: ServeOptions, scale: ScaleOptions, cluster_cpus: float | None = None):
    """The Ray Serve application (``serve.run`` it). ``opts.device`` must already be resolved
    (cpu or cuda): it decides whether each replica reserves a GPU."""
    opts.validate()
    scale.validate(opts)
    return LadrReplica.options(**deployment_options(opts, scale, cluster_cpus)).bind(opts)


ARG_FIELDS = ("model", "engine", "batch", "mode", "max_queue", "api_key", "device", "dtype", "steps", "cfg",
              "temperature", "sampler", "ladr", "height", "width", "prompt_budget", "max_n", "replicas", "autoscale",
              "replica_cpus", "served_model_name", "log_prompts", "read_timeout", "shutdown_grace", "cuda_graph",
              "attention")


def options_from_args(args: dict) -> tuple[ServeOptions, ScaleOptions]:
    """A Serve config file's ``args`` (the CLI's option names, with underscores) -> options.
    device/dtype "auto" resolve here: a GPU when the cluster (or, without Ray running, this
    machine) has one."""
    from ..checkpoint import DTYPES

    args = dict(args or {})
    unknown = sorted(set(args) - set(ARG_FIELDS))
    if unknown:  # a typo would otherwise be silently ignored
        raise ValueError(f"unknown ladr-rt arg {unknown[0]!r}; the args are {', '.join(ARG_FIELDS)}")
    device = args.pop("device", "auto")
    if device == "auto":
        import ray

        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else torch.cuda.device_count()
        device = "cuda" if gpus else "cpu"
    dtype = args.pop("dtype", "auto")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    sampler = SamplerConfig(**{k: args.pop(key) for key, k in (("steps", "steps"), ("cfg", "cfg"),
                                                              ("temperature", "temperature"), ("sampler", "name"))
                               if key in args})
    if "ladr" in args:  # the phase table as `--ladr` takes it: "tau_refine=0.05,alpha_refine=0.3"
        sampler = dataclasses.replace(sampler, ladr=LadrParams.from_option(args.pop("ladr"), sampler.name))
    scale = ScaleOptions(**{k: args.pop(k) for k in ("replicas", "autoscale", "replica_cpus") if k in args})
    run = RunOptions(**{k: args.pop(k) for k in ("cuda_graph", "attention") if k in args})
    run.validate(torch.device(device).type)  # a bad choice fails the deploy here, not in every replica
    opts = ServeOptions(**args, device=device, dtype=None if args.get("engine") else DTYPES[dtype], sampler=sampler,
                        run=run)
    return opts, scale


def app(args: dict):
    """The application builder a Serve config file names (``import_path:
    ladr_rt.serve.ray_serve:app``); ``args`` as in :func:`options_from_args`."""
    opts, scale = options_from_args(args)
    return build(opts, scale)


# ---------------------------------------------------------------------------------------------- the CLI's run


class _Stopped(BaseException):  # not Exception: Ray code that catches Exception must not swallow a stop
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _deploy_failure() -> str | None:
    """Why the deploy failed, in one line, from Ray's status (its exception names only the
    deployment; the replica's traceback is in the deployment's message). None: it did not fail."""
    try:
        st = serve.status().applications[APP_NAME]
        if st.status != "DEPLOY_FAILED":
            return None
        text = "\n".join(d.message or "" for d in st.deployments.values()) or st.message or ""
    except Exception:  # noqa: BLE001 -- the status itself is unreachable: say what is known
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "ReplicaLoadError: " in ln:
            return ln.split("ReplicaLoadError: ", 1)[1]
    return lines[-1] if lines else "no reason reported"


def run(opts: ServeOptions, scale: ScaleOptions, log=print) -> str | None:
    """Starts a local Ray, deploys ``scale``'s replicas behind Ray's HTTP proxy on opts.host:port
    and serves until SIGINT/SIGTERM (returns its name); then Serve and Ray shut down. A replica
    that fails to load, a port in use, or too few GPUs raise ServeError (one line)."""
    import ray

    opts.validate()
    scale.validate(opts)
    # The port is checked here, before Ray starts, so a port in use is one line (Ray's proxy
    # would only log it); port 0 picks a free one for Ray's proxy to take.
    sock = bind(opts.host, opts.port)
    port = sock.getsockname()[1]
    sock.close()
    b = served_batch(opts)
    fired: list[int] = []

    def on_signal(signum, frame):
        if not fired:  # a second signal while shutting down is dropped, so cleanup is not cut short
            fired.append(signum)
            raise _Stopped(signum)

    orig = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    started = False
    try:
        try:
            # address="local": always a new cluster of this machine's CPUs/GPUs, owned (and
            # shut down) by this process; a shared cluster takes the config-file route.
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C / SIGTERM (Ray's own handler) during start-up
            raise _Stopped(signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM) from None
        except Exception as e:  # noqa: BLE001 -- e.g. no space in /tmp for Ray's session, ports refused
            raise ServeError(f"Ray did not start ({_one_line(e)}); see /tmp/ray/session_latest/logs") from None
        finally:
            started = ray.is_initialized()
        for sig in orig:
            signal.signal(sig, on_signal)  # replaces the SIGTERM handler ray.init set (sys.exit)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        res = ray.cluster_resources()
        gpu = str(opts.device).startswith("cuda")
        need = scale.bounds[0] if scale.bounds else (scale.replicas or 1)
        first = scale.replicas or need
        if gpu and res.get("GPU", 0) < first:
            raise ServeError(f"{first} replica(s) on cuda need {first} GPU(s), one each; Ray sees "
                             f"{int(res.get('GPU', 0))}: lower --replicas/--autoscale MIN or use --device cpu")
        dopts = deployment_options(opts, scale, cluster_cpus=res.get("CPU"))
        # Ray waits without end (and without a word) for a placement it cannot make; this
        # cluster is this machine, so what it has is known now.
        cpus_each = dopts["ray_actor_options"]["num_cpus"]
        if cpus_each * first > res.get("CPU", 0) + 1e-9:
            raise ServeError(f"{first} replica(s) of {cpus_each:g} CPU(s) each need {cpus_each * first:g} CPUs; Ray sees "
                             f"{res.get('CPU', 0):g} on this machine: lower --replica-cpus or --replicas (or leave "
                             "--replica-cpus out to split the CPUs)")
        log(f"starting {first} replica(s) on Ray ({_describe(dopts['ray_actor_options'])}); each loads the model")
        serve.start(http_options={"host": opts.host, "port": port}, logging_config={"log_level": "WARNING"})
        try:
            serve.run(LadrReplica.options(**dopts).bind(opts), name=APP_NAME, route_prefix="/")
        except RuntimeError:
            why = _deploy_failure()
            if why is None:
                raise
            raise ServeError(f"a replica failed to load the model: {why}") from None
        log(f"ready: http://{opts.host}:{port}/v1/images/generations ({first} replica(s)"
            f"{f', autoscaling {scale.autoscale}' if scale.autoscale else ''}, batch {b} each, {opts.mode}, "
            f"{opts.device}; Ray's logs: {_log_dir()})")
        while True:
            signal.pause()  # until a signal's handler raises _Stopped
    except _Stopped as s:
        return signal.Signals(s.signum).name
    finally:
        _shutdown(started, orig)


def _describe(actor: dict) -> str:
    if actor.get("num_gpus"):
        return "1 GPU each"
    cpus = actor.get("num_cpus", 1)
    return f"{cpus:g} CPU each, {max(1, math.floor(cpus))} torch thread(s)"


def _log_dir() -> str:
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 -- a private path; only the hint is lost
        return "/tmp/ray/session_latest/logs"


def _shutdown(started: bool, handlers: dict) -> None:
    """Serve first (each replica finishes or fails its requests and closes its scheduler), then
    the Ray this process started; signals are ignored meanwhile, then the caller's handlers are
    back."""
    import ray

    for sig in handlers:
        signal.signal(sig, signal.SIG_IGN)
    try:
        if started:
            try:
                # Deleting the app stops its replicas gracefully (Ray drains them, then their
                # lifespan closes the scheduler); ray.shutdown then ends the controller and
                # proxy. serve.shutdown() would too, but Ray 2.60 prints a spurious "(raylet)
                # Task ServeController.graceful_shutdown failed" line to stdout on the way.
                serve.delete(APP_NAME)
            except Exception:  # noqa: BLE001 -- Ray itself is going away next; nothing to keep
                pass
            ray.shutdown()
    finally:
        for sig, prev in handlers.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


__all__ = ["APP_NAME", "DEPLOYMENT", "LadrReplica", "ReplicaLoadError", "app", "build", "deployment_options",
           "options_from_args", "run", "served_batch"]
