"""A scheduler that owns one pipeline's B slots (vLLM / nano-vllm style, one image per slot).

    sched = Scheduler(LadrPipeline.from_pretrained(batch=4), SamplerConfig(name="ladr", steps=64))
    fut = sched.submit("a red circle above a blue square", seed=3)   # any thread
    fut.result().image.save("out.png")
    sched.close()

Each iteration: admit waiting requests into free slots (device writes between steps), run
one step for all B slots (the pipeline's own step, replayed from one CUDA graph where the
denoiser allows), read the ``[B]`` done flags (the one host read), retire the finished slots
(free for the next iteration's admissions) and hand their codes to a decode thread, which
VQ-decodes them (on its own CUDA stream on a GPU) and completes their futures while the next
step runs: the decoder never sits on the step loop's critical path. A request's image depends
only on its prompt, seed, steps and guidance (each slot has its own noise stream and
schedule), so the mode changes when requests run, never what they produce:

- ``continuous``: a free slot takes the next request at any step;
- ``static``: requests are admitted only into an all-free batch (the batch runs to its
  slowest member);
- ``sequential``: one request at a time (a B = 1 pipeline).

The sampler kind, temperature, its parameters and whether guidance runs at all are fixed
per scheduler (one step graph); ``steps`` (up to the scheduler's) and the guidance scale are
per request.

A request's future can be cancelled (``fut.cancel()`` or ``Scheduler.cancel(fut)``, e.g. when
an HTTP client disconnects): a waiting request leaves the queue at once, a running one frees
its slot at the next step boundary (its partial codes are dropped, no VQ decode).
"""
from __future__ import annotations

import collections
import contextlib
import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..config import SamplerConfig
from ..pipeline import NONFINITE_HINT, LadrPipeline, NonFiniteLogits, plain
from ..samplers import resolve

MODES = ("continuous", "static", "sequential")


def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another libc, or none found)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class QueueFull(RuntimeError):
    """The scheduler's request queue is at its bound; the request was not taken."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request ran."""


@dataclass
class ServeResult:
    image: object  # PIL image
    codes: np.ndarray  # [H, W] int64 final code grid
    trace: dict  # this request's masked / rescued / t_eff per step
    evaluations: int  # steps the request's slot took
    slot: int
    admitted_step: int  # the batch's step count when the request took its slot
    queued_seconds: float  # submit to admission
    run_seconds: float  # admission to codes (excludes VQ decode)
    decode_seconds: float = 0.0  # the VQ decode of the batch of images this one finished with


# eq=False: a request is equal only to itself. The generated __eq__ compared the prompt rows
# (tensors), so deque.remove of a request behind the queue's head raised RuntimeError from
# the cancel callback and the hung-up client's request stayed queued.
@dataclass(eq=False)
class _Request:
    rows: tuple  # (ids [2, L], key_mask [2, L]) from LadrPipeline.prompt_rows
    seed: int
    steps: int
    guidance: float
    future: Future
    submitted: float
    admitted: float = 0.0
    admitted_step: int = 0


class Scheduler:
    """Owns ``pipe`` (its B slots, run-state and buffers) until ``close``. ``start=False``
    leaves the loop to the caller (``run_once``), for tests and benchmarks."""

    def __init__(self, pipe: LadrPipeline, cfg: SamplerConfig = SamplerConfig(), mode: str = "continuous",
                 max_queue: int = 64, start: bool = True, trim_when_idle: bool = True):
        if mode not in MODES:
            raise ValueError(f"unknown scheduler mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "sequential" and pipe.batch != 1:
            raise ValueError(f"mode 'sequential' runs one request at a time: give it a batch-1 pipeline, not "
                             f"batch {pipe.batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if getattr(pipe, "owner", None) is not None:
            raise RuntimeError("this pipeline is already owned by a scheduler")
        self.pipe, self.mode, self.max_queue = pipe, mode, max_queue
        self.cfg = resolve(cfg, pipe.default_cfg)  # the batch's config; cfg.steps bounds a request's steps
        self.steps_run = 0  # steps the batch took (each one evaluation of all B slots)
        self.cancelled = 0  # requests whose future was cancelled before they finished
        self._queue: collections.deque[_Request] = collections.deque()
        self._slots: list[_Request | None] = [None] * pipe.batch
        self._cond = threading.Condition()
        self._closed = False
        self._deadline: float | None = None  # drain(): monotonic time past which nothing more runs
        self._step_s: float | None = None  # a step's seconds (moving average), for drain's estimate
        self._died: str | None = None  # why the loop thread ended without close(); see health()
        with pipe._lock:
            pipe.owner = self  # LadrPipeline.__call__ now refuses: it would reset every slot
            self.sampler = pipe.open_slots(self.cfg)
            self.state = self.sampler.s
            # Captured (where graphs apply) against the idle state; admissions write the same buffers.
            self._step = pipe.step_runner(self.sampler)
        # One decode worker: decodes stay in finishing order, and a second one would only
        # contend with the step for the same cores / SMs.
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ladr-rt-decode")
        dev = pipe.denoiser.device
        self._decode_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        # A step's CPU tensors (megabytes each) go back to glibc's per-thread arenas, which keep
        # the pages: a server's RSS crept up ~70 MiB over its first ~700 requests with a constant
        # Python heap, then stayed (bench/RESULTS.md, "Serving load"). When the batch drains
        # the decode thread hands the free pages back to the OS, so an idle server's RSS is its
        # live memory. Not under load: in two runs on 2 cores, trimming every 32 images came with
        # continuous steps 13-30% slower than static's, against equal without it (same place).
        self._trim = _malloc_trim() if trim_when_idle else None
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="ladr-rt-scheduler", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ any thread

    def submit(self, prompt: str, seed: int = 0, steps: int | None = None, cfg: float | None = None) -> Future:
        """A future of ``ServeResult``. Bad arguments, a full queue (``QueueFull``) or a closed
        scheduler come back as the future's exception; nothing is raised here."""
        fut: Future = Future()
        try:
            seed, steps, cfg = plain(seed), plain(steps), plain(cfg)  # numpy scalars as plain numbers
            req_cfg = dataclasses.replace(self.cfg, seed=seed, steps=self.cfg.steps if steps is None else steps,
                                          cfg=self.cfg.cfg if cfg is None else cfg)
            req_cfg.validate()
            if req_cfg.steps > self.cfg.steps:
                raise ValueError(f"steps {req_cfg.steps} is over this scheduler's {self.cfg.steps}")
            if (req_cfg.cfg > 0) != (self.cfg.cfg > 0):
                raise ValueError(f"guidance {req_cfg.cfg}: this scheduler runs {'with' if self.cfg.cfg > 0 else 'without'}"
                                 " guidance; a request can change its scale but not switch it on or off")
            req = _Request(self.pipe.prompt_rows(prompt), seed, req_cfg.steps, req_cfg.cfg, fut, time.perf_counter())
        except Exception as e:
            fut.set_exception(e)
            return fut
        with self._cond:
            if self._closed or self._deadline is not None:
                fut.set_exception(SchedulerClosed("the scheduler is closed" if self._closed else
                                                  "the server is shutting down"))
            elif len(self._queue) >= self.max_queue:
                fut.set_exception(QueueFull(f"the request queue is full ({self.max_queue} waiting, {self.busy} running);"
                                            " retry later or raise max_queue"))
            else:
                self._queue.append(req)
                self._cond.notify()
                # Registered only once queued: a future that failed above has nothing to free. The
                # callback holds the request weakly: req -> future -> callback -> req would be a
                # cycle, and each finished request (its image, codes, prompt rows) would then wait
                # for the cyclic GC, which in a server holding the model runs rarely.
                fut.add_done_callback(partial(_cancelled, weakref.ref(self), weakref.ref(req)))
        return fut

    def cancel(self, fut: Future) -> bool:
        """Cancels a request (``fut.cancel()`` does the same): False when it already finished."""
        return fut.cancel()

    def _on_cancel(self, req: _Request) -> None:
        # Runs in the cancelling thread. A waiting request leaves the queue now, so it stops
        # counting against max_queue; a running one is retired by the loop at the next step
        # boundary (only the loop's thread touches the slots between steps).
        with self._cond:
            try:
                self._queue.remove(req)
                self.cancelled += 1
            except ValueError:
                pass  # already in a slot (or finished): the loop retires it
            self._cond.notify()

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closed

    def health(self) -> str | None:
        """None while requests can be served; else why not (closed, or the loop thread is gone,
        which would leave every later request waiting forever). Cheap: for health probes."""
        if self._closed:
            return "the scheduler is closed"
        if self._died is not None:
            return f"the scheduler loop died: {self._died}"
        if self._thread is not None and not self._thread.is_alive():
            return "the scheduler loop thread is not running"
        return None

    def forget_step_time(self) -> None:
        """Drops the measured step time: a first step pays one-time costs (the server's warm-up)
        and is no sample of the steps a drain must estimate."""
        self._step_s = None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    def drain(self, grace: float) -> int:
        """Stops taking requests; what can finish within ``grace`` seconds runs on. A waiting
        request that (by the measured step time) cannot finish in time fails now with
        SchedulerClosed, so its client hears at once; whatever is still unfinished at the
        deadline fails then, even while a step is still running. Returns the count failed now."""
        now = time.monotonic()
        with self._cond:
            if self._closed or self._deadline is not None:
                return 0
            self._deadline = now + grace
            late: list[_Request] = []
            if self._step_s is not None:
                # Each slot is free after its request's remaining steps (an upper bound: LADR may
                # finish early); waiting requests take the earliest free slot, in queue order.
                free_at = sorted((0.0 if r is None else max(0, r.steps - (self.steps_run - r.admitted_step)))
                                 * self._step_s for r in self._slots)
                keep: collections.deque[_Request] = collections.deque()
                for req in self._queue:
                    done_at = free_at[0] + req.steps * self._step_s
                    if done_at > grace:
                        late.append(req)
                    else:
                        keep.append(req)
                        free_at[0] = done_at
                        free_at.sort()
                self._queue = keep
            self._cond.notify_all()
        for r in late:
            _settle(r.future, exc=SchedulerClosed("the server is shutting down and this request could not finish "
                                                  "within its grace period"))
        t = threading.Timer(max(0.0, grace), self._expire)
        t.daemon = True
        t.start()
        return len(late)

    def _expire(self) -> None:
        """The drain deadline: every unfinished request fails now. Runs in a timer thread, so a
        step that takes minutes does not hold its clients; only their futures are touched here
        (the slots are the loop's, retired at its next boundary)."""
        with self._cond:
            left = list(self._queue) + [r for r in self._slots if r is not None]
            self._queue.clear()
            self._cond.notify_all()
        for r in left:
            _settle(r.future, exc=SchedulerClosed("the server shut down before the request finished (its grace "
                                                  "period ran out)"))

    def close(self, timeout: float | None = None) -> None:
        """Stops the loop after its current step; waiting and running requests fail with
        SchedulerClosed. The pipeline is free again afterwards."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._decoder.shutdown(wait=True)  # images already made are delivered, not dropped
        with self._cond:
            left = list(self._queue) + [r for r in self._slots if r is not None]
            self._queue.clear()
        for b in range(len(self._slots)):
            if self._slots[b] is not None:
                self.state.retire(b)
                self._slots[b] = None
        for r in left:
            _settle(r.future, exc=SchedulerClosed("the scheduler was closed before the request finished"))
        self.pipe.owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the loop's thread

    def run_once(self) -> bool:
        """One iteration: admit, one step for all slots, finish the done ones. False when there
        was nothing to run (no request running or waiting)."""
        pipe = self.pipe
        with pipe._lock, pipe.thread_scope(), (torch.cuda.device(pipe.denoiser.device)
                                          if pipe.denoiser.device.type == "cuda" else contextlib.nullcontext()):
            self._retire_cancelled()
            self._admit()
            if not self.busy:
                return False
            t0 = time.perf_counter()
            self._step()
            self.steps_run += 1
            done = self.state.read_done()  # the one host read per step
            dt = time.perf_counter() - t0
            self._step_s = dt if self._step_s is None else 0.8 * self._step_s + 0.2 * dt
            finished = [b for b, r in enumerate(self._slots) if r is not None and done[b]]
            if finished:
                self._finish(finished)
        return True

    def run_until_idle(self, max_iterations: int = 1_000_000) -> int:
        """Iterations until nothing runs or waits (for a scheduler made with start=False); the
        finished requests' decodes are done, and their futures settled, when it returns."""
        n = 0
        while n < max_iterations and self.run_once():
            n += 1
        self._decoder.submit(lambda: None).result()  # one FIFO worker: every earlier decode is through
        return n

    def _retire_cancelled(self) -> None:
        for b, r in enumerate(self._slots):
            if r is not None and r.future.done():  # cancelled by its client, or failed by drain's deadline
                self.state.retire(b)
                self._slots[b] = None
                if r.future.cancelled():
                    with self._cond:
                        self.cancelled += 1

    def _admit(self) -> None:
        free = [b for b, r in enumerate(self._slots) if r is None]
        if self.mode != "continuous" and len(free) < len(self._slots):
            return  # static / sequential: a new batch only once the last one is through
        with self._cond:
            taken = [(b, self._queue.popleft()) for b in free[: len(self._queue)]]
        now = time.perf_counter()
        for b, req in taken:
            req.admitted, req.admitted_step = now, self.steps_run
            self.pipe.admit(self.state, b, req.rows, req.seed, req.steps, req.guidance)
            self._slots[b] = req

    def _finish(self, finished: list[int]) -> None:
        s, (h, w) = self.state, self.pipe.seq.grid
        now = time.perf_counter()
        ok, codes = [], []
        for b in finished:
            req = self._slots[b]
            if bool(s.nonfinite[b]):
                _settle(req.future, exc=NonFiniteLogits(
                    f"the {self.pipe.denoiser.name} denoiser returned NaN/inf logits for this request, so no image "
                    f"was made; {NONFINITE_HINT}"))
            else:
                ok.append((b, req, s.read_trace_row(b), now - req.admitted))
                codes.append(s.z[b].view(h, w).clone())
            s.retire(b)
            self._slots[b] = None
        if not ok:
            return
        grid = torch.stack(codes)  # [n, H, W], its own memory: the next step rewrites z
        ready = None
        if self._decode_stream is not None:
            ready = torch.cuda.Event()
            ready.record()  # the clone, on the step's stream; the decode stream waits for it
        self._decoder.submit(self._decode, grid, ready, ok)

    def _decode(self, grid: torch.Tensor, ready, ok: list) -> None:
        """The decode thread: codes -> images -> futures."""
        t0 = time.perf_counter()
        try:
            if self._decode_stream is not None:
                with torch.cuda.device(grid.device), torch.cuda.stream(self._decode_stream):
                    self._decode_stream.wait_event(ready)
                    grid.record_stream(self._decode_stream)  # the caching allocator must not reuse it early
                    # On the decode stream: a copy on the default stream would queue behind the
                    # step the loop has launched since, and hold the finished requests one more step.
                    host, copied = _copy_to_host(grid)
                    images = self.pipe.decode(grid)
                copied.synchronize()  # this copy only, not the step loop's work
                grid_np = host.numpy()
            else:
                images = self.pipe.decode(grid)
                grid_np = grid.cpu().numpy()
        except Exception as e:
            for _, req, _, _ in ok:
                _settle(req.future, exc=e)
            return
        dt = time.perf_counter() - t0
        for (b, req, trace, run_s), img, c in zip(ok, images, grid_np):
            trace["cfg"] = req.guidance
            _settle(req.future, ServeResult(img, c, trace, len(trace["rescued"]), b, req.admitted_step,
                                            req.admitted - req.submitted, run_s, dt))
        # A racy read is harmless: at worst a trim runs as a request arrives, off the step loop.
        if self._trim is not None and not self._queue and not self.busy:
            self._trim(0)

    def _loop(self) -> None:
        try:
            self._serve_forever()
        except BaseException as e:  # noqa: BLE001 -- recorded for health(), then the thread ends as it would
            self._died = f"{type(e).__name__}: {e}"
            raise

    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self.busy:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.run_once()
            except Exception as e:  # a failing step fails the requests it held; the loop goes on
                for b, r in enumerate(self._slots):
                    if r is not None:
                        self.state.retire(b)
                        self._slots[b] = None
                        _settle(r.future, exc=e)



def _copy_to_host(grid: torch.Tensor):
    """On the current stream: ``grid`` copied into pinned host memory without blocking, and an
    event recorded after the copy, whose ``synchronize`` waits for that stream's work only."""
    host = torch.empty(grid.shape, dtype=grid.dtype, pin_memory=True)
    host.copy_(grid, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _cancelled(sched_ref, req_ref, fut: Future) -> None:
    sched, req = sched_ref(), req_ref()
    if fut.cancelled() and sched is not None and req is not None:
        sched._on_cancel(req)


def _settle(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Completes ``fut`` unless it is already done: a client may cancel it from another thread
    between the loop's check and this call, and a cancelled future refuses a result."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
