"""`ladr-rt generate` end to end on a tiny checkpoint, and its one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "ladr_rt.cli"]


def run_subprocess(*args, cwd=None):
    """A real `python -m ladr_rt.cli` process (the entry point, exit codes, stderr as a user sees them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def run_cli(*args):
    """In-process (click's CliRunner): the same command, without 3 s of interpreter and torch start-up
    per call. Stray exceptions would surface as a non-SystemExit ``exception``; they are re-raised."""
    from click.testing import CliRunner

    from ladr_rt.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, r.stderr)


def test_generate_writes_png_tokens_and_trace(tiny_ckpt, tmp_path):
    out, tok, trace = tmp_path / "o.png", tmp_path / "codes", tmp_path / "t.json"  # a bare name stays bare
    # Pinned to fp32 on the CPU: on a CUDA machine the default is cuda + bf16, and the
    # same-seed check below compares two runs exactly.
    pin = ("--device", "cpu", "--dtype", "fp32")
    r = run_subprocess("generate", "--model", str(tiny_ckpt), "--prompt", "a red circle", "--height", "48", "--width",
                       "80", "--steps", "12", "--seed", "3", *pin, "--out", str(out), "--save-tokens", str(tok),
                       "--trace", str(trace), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "evaluations" in r.stdout
    img = Image.open(out)
    assert img.size == (80, 48) and img.mode == "RGB"
    codes = np.load(tok)
    assert codes.shape == (3, 5) and codes.dtype == np.int64 and 0 <= codes.min() and codes.max() < 8192
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask, "outputs get ordinary permissions, not mkstemp's 0600"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes", "o.png", "t.json"], "no temp files left"
    t = json.loads(trace.read_text())
    assert t["evaluations"] == len(t["rescued"]) == len(t["t_eff"]) <= 12
    assert t["masked"][0] == 15 and t["masked"][-1] == 0
    assert all(a > b for a, b in zip(t["masked"], t["masked"][1:]))
    assert t["seconds"] > 0
    assert t["cfg"] == 4.0  # the tiny checkpoint names no ladr_default_cfg: DiMOO's scale is what ran
    # same seed, same image
    out2 = tmp_path / "o2.png"
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "a red circle", "--height", "48", "--width",
                "80", "--steps", "12", "--seed", "3", *pin, "--out", str(out2), "--no-progress")
    assert r.returncode == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(out2)))


def test_help_documents_every_option_with_default():
    r = run_cli("generate", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--prompt", "--height", "--width", "--steps", "--cfg", "--temperature", "--seed",
                "--sampler", "--out", "--save-tokens", "--trace", "--prompt-budget"):
        assert opt in r.stdout
    for default in ("default: 64]", "else 4.0]", "default: 1.0]", "default: ladr]", "default: out.png]"):
        assert default in r.stdout
    assert "baseline|ladr|ladr-delayed" in r.stdout.replace("\n", "").replace(" ", "")


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_height(tiny_ckpt, tmp_path):
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "x", "--height", "50", "--out",
                str(tmp_path / "o.png"))
    _one_line_error(r, "--height 50", "multiple of 16")


def test_prompt_over_budget(tiny_ckpt, tmp_path):
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "red " * 40, "--prompt-budget", "24",
                "--out", str(tmp_path / "o.png"))
    _one_line_error(r, "prompt budget of 24", "--prompt-budget")
    assert not (tmp_path / "o.png").exists()


def test_missing_model_dir(tmp_path):
    r = run_cli("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    _one_line_error(r, "does not exist")


def test_pickle_checkpoint_refused(tiny_ckpt, tmp_path):
    d = tmp_path / "pk"
    shutil.copytree(tiny_ckpt, d)
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    r = run_cli("generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    _one_line_error(r, "pickle", "safetensors")


def test_unwritable_out(tiny_ckpt, tmp_path):
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "x", "--out", str(tmp_path / "no" / "o.png"))
    _one_line_error(r, "--out", "does not exist")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits
            pytest.skip("running as root: a read-only directory is still writable")
        r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "x", "--out", str(ro / "o.png"))
        _one_line_error(r, "cannot create files")
    finally:
        ro.chmod(0o700)


def test_out_is_directory(tiny_ckpt, tmp_path):
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "x", "--out", str(tmp_path))
    _one_line_error(r, "is a directory")


def test_init_tiny_then_generate(tmp_path):
    r = run_cli("init-tiny", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "noise" in r.stdout
    r = run_cli("generate", "--model", str(tmp_path / "m"), "--prompt", "a cat", "--steps", "4", "--out",
                str(tmp_path / "x.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "x.png").size == (96, 64)  # the tiny model's default size


@pytest.mark.parametrize("device,needle", [("gpu", "is not a device"), ("meta", "runs on cpu or cuda")])
def test_bad_device(tiny_ckpt, tmp_path, device, needle):
    r = run_cli("generate", "--model", str(tiny_ckpt), "--prompt", "x", "--device", device, "--out",
                str(tmp_path / "o.png"))
    _one_line_error(r, needle)


def test_unsupported_config_option(tiny_ckpt, tmp_path):
    d = tmp_path / "biased"
    shutil.copytree(tiny_ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["include_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    _one_line_error(r, "include_bias")


def test_missing_shipped_model_is_one_line(tmp_path, monkeypatch):
    import ladr_rt.shipped
    from click.testing import CliRunner
    from ladr_rt.cli import main

    monkeypatch.setattr(ladr_rt.shipped, "model_dir", lambda: tmp_path / "not-installed")
    r = CliRunner().invoke(main, ["generate", "--prompt", "a red circle", "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 1 and "missing from this install; pass a model directory (--model DIR)" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.png").exists()
