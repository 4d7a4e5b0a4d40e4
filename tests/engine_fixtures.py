"""Engine fixtures shared by tests/test_engines*.py and tests/test_build*.py.

Import what a test module needs (``from engine_fixtures import tiny_engine, run_cli_inproc``);
pytest then treats the imported names as that module's fixtures.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

TINY_SHAPE = {"height": 48, "width": 80, "prompt_budget": 32}  # 3 x 5 grid, L = 32 + 2 + 18 + 2 = 54


def run_cli_inproc(*args):
    from ladr_rt.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def one_line_error(r, *needles, code: int | None = None) -> str:
    """Exit code != 0 (``code`` if given), one non-empty line on stderr, no traceback, every needle in it."""
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def build_args(model, out, precision="fp32", device="cpu", **shape):
    """``build`` arguments for the tiny engines. The device is pinned to the CPU by default: on a
    CUDA machine the build would export and validate on the GPU, and the exact engine == eager
    comparisons are made against the CPU eager model."""
    s = {**TINY_SHAPE, **shape}
    return ["build", "--model", model, "--height", s["height"], "--width", s["width"], "--prompt-budget",
            s["prompt_budget"], "--precision", precision, "--backend", "onnx", "--out", out,
            *(["--device", device] if device else [])]


# Each test module that imports ``tiny_engine`` gets its own session fixture definition, so
# without this cache every such module would build the engine again (~4 s each).
_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_engine(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint built as an fp32 onnx engine: returns engines/NAME (no suffix).
    Tests copy it before changing anything."""
    if str(tiny_ckpt) not in _BUILT:
        out = tmp_path_factory.mktemp("engines") / "tiny"
        r = run_cli_inproc(*build_args(tiny_ckpt, out))
        assert r.exit_code == 0, r.output
        _BUILT[str(tiny_ckpt)] = out
    return _BUILT[str(tiny_ckpt)]
