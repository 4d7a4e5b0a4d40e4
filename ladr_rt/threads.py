"""CPU intra-op threads for the eager denoiser: chosen from the size of its matmuls, unless the
user chose.

torch's default is one OpenMP thread per core, and its threads spin-wait between ops. A small
model's matmuls take well under a millisecond; split over two threads on cores that another
process keeps busy, each op waits for a descheduled thread, and the shipped testbed model's
sampling measured 10-20x slower than on one thread (docs/cpu-threads.md). So a run whose
largest matmul is small takes one thread, and a big model takes one thread per
``FLOPS_PER_THREAD`` of that matmul, up to what torch would use.

The user's choice always wins: an explicit count (``LadrPipeline.from_pretrained(...,
cpu_threads=N)``), ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the environment (the CLI's way), or
``torch.set_num_threads`` called after ``ladr_rt.pipeline`` was imported (one made before cannot
be told apart from torch's default: use the argument or the environment then).
"""
from __future__ import annotations

import contextlib
import os

import torch

# torch's count when this module was imported (with ladr_rt.pipeline): the cap for a big model, and the reference that tells a
# later torch.set_num_threads by the user from torch's own default.
AT_IMPORT = torch.get_num_threads()
ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# ~5 ms of one core's fp32 matmul: below it a thread costs more in waiting than it saves.
FLOPS_PER_THREAD = 2**28


def largest_matmul_flops(d_model: int, mlp_hidden: int, rows: int, seq_len: int) -> int:
    """The MLP's up-projection, [rows * seq_len, d_model] x [d_model, mlp_hidden]: the biggest op
    of one evaluation (the head sees only the image positions)."""
    return 2 * rows * seq_len * d_model * mlp_hidden


def choose(flops: int | None, requested: int | None = None) -> int | None:
    """The thread count a run should use; None: leave torch's setting as it is."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be a positive integer, got {requested!r}")
        return requested
    if any(os.environ.get(k, "").strip() for k in ENV):
        return None  # torch already read it at start-up
    if torch.get_num_threads() != AT_IMPORT:
        return None  # torch.set_num_threads since import: the user's
    if flops is None:
        return None  # no model to size (an engine): its runtime keeps its own threads
    return max(1, min(AT_IMPORT, flops // FLOPS_PER_THREAD))


@contextlib.contextmanager
def scope(n: int | None):
    """Run the block on ``n`` intra-op threads and put the previous count back after it, so a
    caller's own torch work keeps its setting (and ``choose`` keeps telling it apart)."""
    prev = torch.get_num_threads()
    if n is None or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
