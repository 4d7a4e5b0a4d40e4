"""Shared fixtures: tiny DiMOO-format checkpoints written once per session."""
from __future__ import annotations

import importlib
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


def in_ci() -> bool:
    """CI installs the dev extra: there a missing optional package is a broken CI, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def import_extra(name: str, extra: str, why: str = ""):
    """``import name`` for a test module that needs an optional extra. Where it is missing (the
    GPU machine has no ray, fastapi, uvicorn or diffusers) the module skips with the reason, so
    the rest of the suite still collects; under ``CI=true`` the ImportError propagates and
    collection fails."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if in_ci():
            raise
        pytest.skip(f"{name} is not installed ({e}){': ' + why if why else ''}; pip install 'ladr-rt[{extra}]'",
                    allow_module_level=True)


def _needs_diffusers() -> None:
    """The tiny checkpoints carry a diffusers VQModel (ladr_rt/tiny.py): without diffusers the
    tests that build one skip, naming the fix (on the GPU machine: carried wheels)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        if in_ci():
            raise
        pytest.skip(f"diffusers does not import here ({str(e)[:160]}): the tiny checkpoint's vqvae/ is a diffusers "
                    "VQModel; pip install diffusers (on the GPU machine: bench/device/fetch_wheels.sh here, then "
                    "bench/device/run_check.sh there installs .whl/)")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """2 layers, d_model 32, MHA, DiMOO's real vocab and special ids, sharded safetensors."""
    _needs_diffusers()
    from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_ckpt(tmp_path_factory):
    """GQA variant: 4 query heads sharing 2 kv heads."""
    _needs_diffusers()
    from ladr_rt.tiny import tiny_config, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_gqa", tiny_config(n_kv_heads=2), seed=1)
