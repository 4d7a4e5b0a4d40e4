"""Shared fixtures: tiny DiMOO-format checkpoints written once per session."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# The weights-digest cache (~/.cache/ladr-rt) belongs to the user, not to a test run.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ladr-test-cache-")

torch.set_num_threads(min(2, torch.get_num_threads()))


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device on this machine (CI and dev machines are CPU-only)"
    return None


requires_cuda = pytest.mark.skipif(_cuda_reason() is not None, reason=_cuda_reason() or "")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """2 layers, d_model 32, MHA, DiMOO's real vocab and special ids, sharded safetensors."""
    from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_ckpt(tmp_path_factory):
    """GQA variant: 4 query heads sharing 2 kv heads."""
    from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_gqa", tiny_config(n_kv_heads=2), seed=1)
