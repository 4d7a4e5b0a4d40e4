"""A user's own files, signals and odd environments around the CLI and the Python API:
init-tiny never touches what it did not write; Ctrl-C stops a run; stdout, file names and the
working directory failing in one line; API arguments refused by name; unknown prompt words
reported. Real `python -m ladr_rt.cli` processes where the item is about the process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import one_line_error, run_cli_inproc as cli

CLI = [sys.executable, "-m", "ladr_rt.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--d-model", "8", "--layers", "1"]


def proc(*args, cwd=None, **kw):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=300, **kw)


def one_line(stderr: str, *needles) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- init-tiny and the user's files

@pytest.fixture
def tiny_dir(tmp_path):
    d = tmp_path / "tiny"
    assert cli("init-tiny", str(d), *TINY).exit_code == 0
    return d


@pytest.mark.parametrize("name", ["model-finetuned.safetensors", "tokenizer_notes.txt", "vqvae/my.safetensors",
                                  "special_tokens_map.json"])
def test_init_tiny_keeps_user_files_named_like_its_own(tiny_dir, name):
    (tiny_dir / name).write_bytes(b"years of work")
    before = tree(tiny_dir)
    one_line_error(cli("init-tiny", str(tiny_dir), *TINY, "--seed", "1"), name, "nothing was changed")
    assert tree(tiny_dir) == before


def test_init_tiny_refuses_its_own_files_once_edited(tiny_dir):
    cfg = tiny_dir / "config.json"
    cfg.write_text(cfg.read_text().replace('"rope_theta": 500000.0', '"rope_theta": 10000.0'))
    before = tree(tiny_dir)
    one_line_error(cli("init-tiny", str(tiny_dir), *TINY, "--seed", "1"), "config.json changed", "nothing was changed")
    assert tree(tiny_dir) == before


def test_init_tiny_refuses_a_marker_without_digests(tiny_dir):
    (tiny_dir / "LADR_TINY_CHECKPOINT").write_text("written by `ladr-rt init-tiny`; random weights\n")  # older ladr-rt
    before = tree(tiny_dir)
    one_line_error(cli("init-tiny", str(tiny_dir), *TINY), "does not list the files", "nothing was changed")
    assert tree(tiny_dir) == before


def test_init_tiny_rewrites_exactly_its_own_files_with_one_mode(tiny_dir):
    before = tree(tiny_dir)
    assert cli("init-tiny", str(tiny_dir), *TINY, "--seed", "1").exit_code == 0
    after = tree(tiny_dir)
    assert sorted(after) == sorted(before) and after != before
    marker = json.loads(after["LADR_TINY_CHECKPOINT"])
    assert set(marker["files"]) == set(after) - {"LADR_TINY_CHECKPOINT"}
    umask = os.umask(0)
    os.umask(umask)
    modes = {n: (tiny_dir / n).stat().st_mode & 0o777 for n in after}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the VQ weights too (safetensors writes 0600)
    assert [p.name for p in tiny_dir.parent.iterdir()] == ["tiny"], "no temp or old dirs left"


def test_init_tiny_dot_from_inside_keeps_the_directory(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    ino = d.stat().st_ino
    for seed in ("0", "1"):  # into the empty directory, then over its own files
        r = proc("init-tiny", ".", *TINY, "--seed", seed, cwd=d)
        assert r.returncode == 0, r.stderr
    assert d.stat().st_ino == ino, "the shell's working directory is the same directory, not a deleted one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no '..old.*' or temp directory left"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    assert (d / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()


def test_init_tiny_through_a_symlink_to_a_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    r = cli("init-tiny", str(link), *TINY)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and (real / "config.json").is_file()
    assert cli("init-tiny", str(link), *TINY, "--seed", "1").exit_code == 0  # and again, over its own files
    f = tmp_path / "f"
    f.write_text("x")
    bad = tmp_path / "bad"
    bad.symlink_to(f)
    one_line_error(cli("init-tiny", str(bad), *TINY), "symlink", "not a directory")
    assert f.read_text() == "x"


# ----------------------------------------------------------------- another model's tokenizer

def test_another_models_tokenizer_is_refused_at_load(tiny_ckpt, tmp_path):
    from ladr_rt.shipped import model_dir as shipped

    d = tmp_path / "mixed"
    d.mkdir()
    for f in tiny_ckpt.iterdir():
        (d / f.name).symlink_to(f)
    for f in shipped().glob("tokenizer*"):  # the shipped model's tokenizer: <uncondition> is its id 37
        (d / f.name).unlink(missing_ok=True)
        (d / f.name).symlink_to(f)
    out = tmp_path / "o.png"
    one_line_error(cli("generate", "--model", str(d), "--prompt", "a red circle", "--out", str(out), "--no-progress"),
                   "<uncondition> to id 37", "126351", "another model", "restore tokenizer.json")
    assert not out.exists()


# ----------------------------------------------------------------- Python API arguments

@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    from ladr_rt.pipeline import LadrPipeline

    return LadrPipeline.from_pretrained(tiny_ckpt, 48, 80)


@pytest.mark.parametrize("kw,exc,needle", [
    ({"batch": 0}, ValueError, "batch"), ({"batch": -1}, ValueError, "batch"), ({"batch": 1.5}, TypeError, "batch"),
    ({"height": "48"}, TypeError, "height"), ({"dtype": "int8"}, ValueError, "dtype")])
def test_from_pretrained_refuses_bad_arguments_by_name(tiny_ckpt, kw, exc, needle):
    from ladr_rt.pipeline import LadrPipeline

    with pytest.raises(exc, match=needle):
        LadrPipeline.from_pretrained(tiny_ckpt, **kw)


@pytest.mark.parametrize("model_dir", [123, b"/tmp", ["a"], 1.5])
def test_from_pretrained_refuses_a_non_path_model_dir(model_dir):
    from ladr_rt.pipeline import LadrPipeline

    with pytest.raises(TypeError, match="model_dir must be a directory path"):
        LadrPipeline.from_pretrained(model_dir)


def test_one_default_dtype_for_the_api_and_the_cli(tiny_ckpt):
    import inspect

    import torch
    from ladr_rt.checkpoint import resolve_dtype
    from ladr_rt.cli import _device_dtype
    from ladr_rt.pipeline import LadrPipeline

    assert inspect.signature(LadrPipeline.from_pretrained).parameters["dtype"].default is None
    # an 8B model: 16 GB in bf16, not 32
    assert resolve_dtype(None, "cuda:1") == resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype(None, "cpu") == torch.float32
    assert _device_dtype("cpu", "auto") == ("cpu", torch.float32)
    p = LadrPipeline.from_pretrained(tiny_ckpt, 48, 80, dtype="bf16")
    assert next(p.denoiser.model.parameters()).dtype == torch.bfloat16


def test_call_refuses_a_none_config_and_accepts_numpy_scalars(pipe):
    from ladr_rt.config import SamplerConfig

    with pytest.raises(TypeError, match="cfg must be a ladr_rt.SamplerConfig"):
        pipe("a red circle", None)
    with pytest.raises(TypeError, match="prompts"):
        pipe(None, SamplerConfig(steps=2))
    want = pipe("a red circle", SamplerConfig(steps=4, seed=3, cfg=2.5, temperature=0.5)).codes
    got = pipe("a red circle", SamplerConfig(steps=np.int64(4), seed=np.int64(3), cfg=np.float32(2.5),
                                             temperature=np.float32(0.5)))
    assert np.array_equal(got.codes, want)
    assert type(got.trace["cfg"]) is float


def test_scheduler_refuses_a_none_prompt_and_takes_numpy_seeds(pipe):
    from ladr_rt.config import SamplerConfig
    from ladr_rt.serve.scheduler import Scheduler
    from ladr_rt.tokens import PromptError

    want = pipe("a red circle", SamplerConfig(steps=4, seed=3, cfg=2.5)).codes[0]
    with Scheduler(pipe, SamplerConfig(steps=4), start=False) as sched:
        fut = sched.submit(None)
        assert isinstance(fut.exception(0), PromptError) and "prompt must be text" in str(fut.exception(0))
        assert sched.waiting == 0
        fut = sched.submit("a red circle", seed=np.int64(3), cfg=np.float32(2.5), steps=np.int64(4))
        sched.run_until_idle()
        assert np.array_equal(fut.result(0).codes, want)


# ----------------------------------------------------------------- Ctrl-C and long steps

# `ladr-rt` with an evaluation that spends ~30 s in one C call that releases the GIL (as one
# torch op of a huge size on a CPU does): Python would run a signal handler only after it.
SLOW_STEP = """
import hashlib, sys
import ladr_rt.denoiser as d
real = d.EagerDenoiser.__call__
def slow(self, *a):
    sys.stderr.write("STEP\\n"); sys.stderr.flush()
    hashlib.pbkdf2_hmac("sha256", b"x", b"y", 20_000_000)
    return real(self, *a)
d.EagerDenoiser.__call__ = slow
from ladr_rt.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig,code,needle", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_a_signal_stops_generate_during_a_long_step(tiny_ckpt, tmp_path, sig, code, needle):
    out = tmp_path / "o.png"
    p = subprocess.Popen([sys.executable, "-c", SLOW_STEP, "generate", "--model", str(tiny_ckpt), "--prompt", "a cat",
                          "--height", "48", "--width", "80", "--steps", "4", "--out", str(out), "--no-progress"],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stderr.readline() == "STEP\n"  # in the first evaluation
        time.sleep(0.5)
        t0 = time.monotonic()
        p.send_signal(sig)
        rc = p.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        p.kill()
        p.wait()
    err = p.stderr.read()
    assert rc == code, (rc, err)
    assert took < 8, f"stopped {took:.1f} s after the signal, not within the step's grace"
    one_line(err, needle, "no output was written")
    assert sorted(x.name for x in tmp_path.iterdir()) == [], "nothing written, no temp file"


def test_a_stop_event_ends_the_run_at_the_next_step(pipe):
    import threading

    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import GenerationStopped

    stop, steps = threading.Event(), []

    def on_step(sampler):
        steps.append(1)
        if len(steps) == 2:
            stop.set()

    with pytest.raises(GenerationStopped, match="after 2 of at most 64 steps"):
        pipe.generate_codes("a red circle", SamplerConfig(steps=64, cfg=2.0), on_step=on_step, stop=stop)
    assert len(steps) == 2
    assert pipe("a red circle", SamplerConfig(steps=3)).evaluations == 3, "the pipeline is usable after a stop"


def test_progress_bar_closes_at_the_steps_that_ran(tiny_ckpt, tmp_path):
    r = cli("generate", "--model", str(tiny_ckpt), "--prompt", "a red circle", "--height", "48", "--width", "80",
            "--steps", "64", "--progress", "--out", str(tmp_path / "o.png"))
    assert r.exit_code == 0, r.output
    evals = int(r.stdout.split(": ")[1].split()[0])
    assert evals < 64
    last = r.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert f"{evals}/{evals}" in last and "/64" not in last, last


# ----------------------------------------------------------------- unknown prompt words

def test_unknown_words_are_named_in_one_warning_line(tmp_path):
    out = tmp_path / "o.png"
    r = cli("generate", "--prompt", "a cat sitting on a red sofa", "--steps", "4", "--no-progress", "--out", str(out))
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: "), r.stderr
    for w in ("'cat'", "'sitting'", "'on'", "'sofa'", "it knows these 31", "circle"):
        assert w in lines[0], lines[0]
    assert "'red'" not in lines[0] and out.is_file()
    r = cli("generate", "--prompt", "a red circle", "--steps", "4", "--no-progress", "--out", str(out))
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert "ladr-rt vocab" in cli("generate", "--help").stdout


def test_unknown_words_come_back_in_the_api_result():
    from ladr_rt.config import SamplerConfig
    from ladr_rt.pipeline import LadrPipeline

    pipe = LadrPipeline.from_pretrained(batch=2)
    res = pipe(["a cat above a red circle", "a blue square"], SamplerConfig(steps=2))
    assert len(res.warnings) == 1 and "'cat'" in res.warnings[0] and "'above'" not in res.warnings[0]
    assert pipe.prompt_warning("two blue squares") is None


def test_vocab_lists_the_words(tiny_ckpt):
    r = cli("vocab")
    assert r.exit_code == 0
    words = r.stdout.split()
    assert len(words) == 31 and {"red", "circle", "above"} <= set(words) and "<uncondition>" not in words
    r = cli("vocab", "--model", str(tiny_ckpt))
    assert r.exit_code == 0 and "cat" in r.stdout.split() and "<user>" not in r.stdout


# ----------------------------------------------------------------- --help is quick

HELP_IMPORTS = """
import sys
from ladr_rt.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED:" + " ".join(m for m in ("torch", "transformers", "numpy", "PIL", "safetensors") if m in sys.modules))
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["serve", "--help"], ["build", "--help"],
                                  ["init-tiny", "--help"], ["--version"]])
def test_help_imports_no_torch(args):
    r = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *args], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == "IMPORTED:", f"`ladr-rt {' '.join(args)}` imported {last}"


# ----------------------------------------------------------------- stdout, file names, working directory

QUICK = ["generate", "--prompt", "a red circle", "--steps", "2", "--no-progress"]


@pytest.mark.parametrize("how", ["full", "closed"])
def test_stdout_failing_after_the_image_is_one_line_and_exit_1(tmp_path, how):
    out = tmp_path / "o.png"
    if how == "full":
        with open("/dev/full", "w") as full:
            r = subprocess.run(CLI + QUICK + ["--out", str(out)], stdout=full, stderr=subprocess.PIPE, text=True,
                               env=ENV, timeout=300)
        rc, err = r.returncode, r.stderr
    else:  # `| head -c0`: the reader is gone before the report line
        p = subprocess.Popen(CLI + QUICK + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
        p.stdout.close()
        err = p.stderr.read()
        rc = p.wait(timeout=300)
    assert rc == 1, err
    one_line(err, "o.png written", "could not go to stdout",
             "No space left on device" if how == "full" else "Broken pipe")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_out_names_at_and_over_the_file_system_limit(tmp_path):
    longest = tmp_path / ("a" * 251 + ".png")  # 255 bytes: legal, though its temp name would not be
    r = cli(*QUICK, "--out", str(longest))
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == [longest.name], "written, no temp file left"
    over = tmp_path / ("b" * 252 + ".png")
    one_line_error(cli(*QUICK, "--out", str(over)), "--out", "256 bytes", "limit of 255", "shorter name")
    assert [p.name for p in tmp_path.iterdir()] == [longest.name]


def test_a_deleted_working_directory_is_one_line(tmp_path):
    d = tmp_path / "gone"
    d.mkdir()
    script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
    r = subprocess.run(["sh", "-c", script, "sh", str(d), *CLI, *QUICK, "--out", str(tmp_path / "o.png")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 1, r.stderr
    one_line(r.stderr, "current directory no longer exists", "cd to an existing directory")
    assert "oneMKL" not in r.stderr and not (tmp_path / "o.png").exists()


def test_a_long_run_says_its_estimated_time_first(tiny_ckpt, tmp_path, monkeypatch):
    import torch

    import ladr_rt.cli as cli_module
    from ladr_rt.config import ImageSpec, SamplerConfig
    from ladr_rt.pipeline import device_flops
    from ladr_rt.tiny import tiny_config
    from ladr_rt.tokens import SequenceLayout

    # The largest size generate accepts, on this CPU: far past a minute, so it is said.
    seq = SequenceLayout(ImageSpec(8192, 8192), tiny_config().layout)
    flops = tiny_config().flops_per_eval(seq.seq_len, seq.n_image, 2) * SamplerConfig().steps
    assert flops > cli_module.LONG_RUN_FLOPS
    assert flops / device_flops(torch.device("cpu"), torch.float32) > cli_module.LONG_RUN_SECONDS
    # The line itself, from a small run with the bar lowered to it.
    monkeypatch.setattr(cli_module, "LONG_RUN_FLOPS", 0)
    monkeypatch.setattr(cli_module, "LONG_RUN_SECONDS", 0)
    r = cli("generate", "--model", str(tiny_ckpt), "--prompt", "a red circle", "--height", "48", "--width", "80",
            "--steps", "3", "--no-progress", "--out", str(tmp_path / "o.png"))
    assert r.exit_code == 0, r.output
    one_line(r.stderr, "48x80 with 3 steps on cpu", "TFLOP: at least", "Ctrl-C stops it")
