"""Whole-step CUDA graphs: the torch.cuda calls of a capture (``CudaGraphs``, a seam CPU tests
replace) and a pipeline's cache of captured steps (``StepGraphs``). Below both the pipeline and
the engines, which capture through it."""
from __future__ import annotations

import contextlib
import dataclasses

import torch


class CudaGraphs:
    """The torch.cuda calls of a whole-step capture, behind one object (``LadrPipeline.graphs``)
    so that CPU tests can stand a fake in for it and run the capture, cache and fallback logic."""

    def usable(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def synchronize(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def capture(self, fn, device: torch.device, generators: tuple[torch.Generator, ...] = ()):
        """One warm-up call of ``fn``, then ``fn`` captured into a new ``torch.cuda.CUDAGraph``.

        Warm-up and capture share one side stream: cuBLAS workspaces and allocator blocks are
        per stream, so a warm-up elsewhere would leave their lazy creation inside the capture.
        ``generators``: those ``fn`` draws from (one per slot), each registered so that each
        replay reads its current seed and offset and then advances it. A CUDAGraph takes
        several registered generators; a replay advances each by what the capture drew from it."""
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        graph = None
        try:
            with torch.cuda.stream(side):
                fn()
            graph = _new_graph()
            if generators:
                if not hasattr(graph, "register_generator_state"):
                    raise RuntimeError(f"torch {torch.__version__}'s CUDAGraph has no register_generator_state, so "
                                       "replays could not draw fresh noise from the sampler's generator")
                for g in generators:
                    graph.register_generator_state(g)
            with torch.cuda.graph(graph, stream=side):
                fn()
            if graph.exact:
                graph.instantiate()  # kept apart from capture_end: see _new_graph
        except BaseException:
            # torch.cuda.graph leaves its stream current when capture_begin or capture_end raises,
            # and a graph whose capture failed still holds its memory pool and generator entry.
            if torch.cuda.current_stream(device) != cur:
                torch.cuda.set_stream(cur)
            if graph is not None:
                with contextlib.suppress(Exception):
                    self.recover(device, graph)
                with contextlib.suppress(Exception):
                    graph.reset()
            raise
        finally:
            cur.wait_stream(side)
        return graph

    def recover(self, device: torch.device, graph) -> None:
        """After ``graph``'s capture failed: what its unfinished capture left behind, undone.

        torch (2.11) runs capture_end's epilogue only when the capture ended cleanly: otherwise the
        default CUDA generator (and every registered one) stays in capture mode, so replaying an
        earlier graph or drawing from it raises, and the graph's private pool is never released
        (reset() releases only an ended capture). A one-kernel capture on a fresh stream runs
        the prologue/epilogue pair to completion, which returns the default generator to normal;
        the pool is closed to new allocations and released here."""
        if graph.began and not graph.ended:
            index = device.index if device.index is not None else (
                torch.cuda.current_device() if device.type == "cuda" else 0)
            with contextlib.suppress(Exception):  # capture_end may have closed it before it raised
                torch._C._cuda_endAllocateToPool(index, graph.pool())
            if graph.exact:  # else an ended capture may have failed later, and reset() releases the pool
                with contextlib.suppress(Exception):
                    torch._C._cuda_releasePool(index, graph.pool())
            graph.ended = True  # released: never again
        cur = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(cur)
        x = torch.zeros(1, device=device)
        dummy = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(dummy, stream=side):
                x.add_(1)
        finally:
            if torch.cuda.current_stream(device) != cur:
                torch.cuda.set_stream(cur)
            cur.wait_stream(side)
        dummy.reset()


def _new_graph():
    """A CUDAGraph that records how far its capture got (``began``, ``ended``). ``exact``: made
    with ``keep_graph=True``, so capture_end stops where torch marks the capture ended and
    instantiation is a call of its own: ``ended`` False then means torch will never release the
    pool itself. Without keep_graph (older torch) a failed instantiation inside capture_end
    would look the same, and releasing the pool there too would release it twice."""
    cls = _tracked(torch.cuda.CUDAGraph)
    try:
        graph = cls(keep_graph=True)
        graph.exact = True
    except TypeError:
        graph = cls()
        graph.exact = False
    return graph


def _tracked(base):
    """``base`` (torch.cuda.CUDAGraph) that records how far its capture got, which torch does
    not expose: ``recover`` must release the pool of a capture that began and never ended.
    Same class name: callers (the benchmark's rows) tell a graph replay by it."""

    class CUDAGraph(base):
        began = ended = False

        def capture_begin(self, *a, **kw):
            super().capture_begin(*a, **kw)
            self.began = True

        def capture_end(self):
            super().capture_end()
            self.ended = True

    return CUDAGraph


class StepGraphs:
    """A pipeline's whole-step graphs, one per (sampler and its config less the seed, T, batch).

    A graph reads and writes the run-state, the pipeline's buffers and the slots' generators by
    address, so the cache holds only graphs captured against the objects it is bound to: binding
    to another run-state, generator or denoiser drops every entry. The seed is left out of the key
    because a replay reads each generator's current seed (RunState.reset and RunState.admit
    reseed them in place)."""

    max_entries = 4  # each graph keeps a private memory pool (a step's intermediates)

    def __init__(self):
        self.entries: dict[str, object] = {}  # key -> CUDAGraph, or None: its capture failed, run plain steps
        self.bound: tuple = ()

    @staticmethod
    def key(sampler) -> str:
        s = sampler.s
        return repr((type(sampler).__name__, dataclasses.replace(sampler.cfg, seed=0), s.T, s.B))

    def bind(self, *objs) -> None:
        if len(objs) != len(self.bound) or any(a is not b for a, b in zip(objs, self.bound)):
            self.entries.clear()
            self.bound = objs

    def put(self, key: str, graph) -> None:
        while len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = graph


CUDA_GRAPHS = CudaGraphs()
