"""Hostile inputs to `build` and `generate --engine` (issue 12), and the GPU-only code paths
of issue 13 exercised on the CPU with fake TensorRT / onnxruntime objects.

Every hostile case: exit code != 0 (or the exception type, through the Python API), one line
without a traceback that names the file or field and the fix, and nothing left behind (no
``.NAME.build-*`` temp directory, no partial output).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import types
import weakref

import numpy as np
import pytest
import torch

from engine_fixtures import TINY_SHAPE, build_args, one_line_error, run_cli_inproc, tiny_engine  # noqa: F401

import ladr_rt.build as b
from ladr_rt.checkpoint import checkpoint_digest, digest_cache_file, file_sha256s, weight_files
from ladr_rt.engines import EngineError, check_manifest, read_manifest
from ladr_rt.engines.manifest import build_command

SMALL = {"height": 32, "width": 32, "prompt_budget": 24}  # the smallest engine: 2 x 2 codes


@pytest.fixture(autouse=True)
def _own_digest_cache(tmp_path, monkeypatch):
    """Each test its own per-user digest cache, so one test's cache cannot hide another's change."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _leftovers(d, name):
    """Temp directories, lock files and partial files of engine ``name`` in ``d``."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{name}.") or p.name.startswith(f"{name}."))


def _copy_engine(engine, d):
    d.mkdir(exist_ok=True)
    for p in engine.parent.glob(f"{engine.name}.*"):
        shutil.copy2(p, d / p.name)
    return d / engine.name


def _edit_manifest(e, edit):
    p = e.parent / f"{e.name}.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))
    return p


def _one_line(exc: BaseException, *needles) -> str:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ------------------------------------------------------------------ A8: digests


def _old_sampled_ranges(size, samples=16, block=1 << 16):
    return [(max(0, (size - block) * i // samples), max(0, (size - block) * i // samples) + block)
            for i in range(samples + 1)]


def _flip_unsampled_byte(shard):
    """Change one byte of tensor data that the old 17 x 64 KiB sampled digest never read,
    keeping the size and the mtime (as `touch -r` or an rsync -t copy would)."""
    size = shard.stat().st_size
    ranges = _old_sampled_ranges(size)
    off = (ranges[7][1] + ranges[8][0]) // 2  # halfway between two sampled blocks
    assert all(not a <= off < e for a, e in ranges) and off > 1 << 16  # past the header, unsampled
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(off)
        byte = f.read(1)
        f.seek(off)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_weights_digest_covers_every_byte_and_a_stale_engine_is_refused(tiny_engine, tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    before = checkpoint_digest(d)
    assert before == checkpoint_digest(tiny_ckpt), "a copy keeps the identity"
    shard = max(weight_files(d), key=lambda f: f.stat().st_size)  # the embedding's shard
    _flip_unsampled_byte(shard)
    assert checkpoint_digest(d) != before, "a changed byte (same size, same mtime) must change the digest"
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--model", d, "--prompt", "x", "--device", "cpu",
                       "--out", tmp_path / "o.png")
    one_line_error(r, "weights are not the ones it was built from", "ladr-rt build --model")
    assert not (tmp_path / "o.png").exists()


def _aged_copy(src, dst):
    """A copy whose files were last written a minute ago: a file written in the last 2 s is
    hashed but not cached (coarse file-system timestamps), and these tests are about the cache."""
    shutil.copytree(src, dst)
    t = os.stat(dst).st_mtime - 60
    for f in dst.rglob("*"):
        os.utime(f, (t, t))
    return dst


def test_digest_cache_is_used_and_survives_damage_and_unwritable_places(tiny_ckpt, tmp_path, monkeypatch):
    d = _aged_copy(tiny_ckpt, tmp_path / "m")
    dead = digest_cache_file(tmp_path / "gone").parent / "dead.json"  # a deleted directory's sums
    dead.parent.mkdir(parents=True)
    dead.write_text(json.dumps({"format": 1, "dir": str(tmp_path / "gone"), "files": {}}))
    original = checkpoint_digest(tiny_ckpt)
    assert not dead.exists(), "cache files of directories that are gone are pruned"
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, alg: reads.append(f.name) or real(f, alg))
    files = weight_files(d)
    before = sorted(p.name for p in d.iterdir())
    want = checkpoint_digest(d)
    n = len(reads)
    assert n == len(files) and want == original
    assert checkpoint_digest(d) == want and len(reads) == n, "second call: from the cache, no re-read"
    assert sorted(p.name for p in d.iterdir()) == before, "nothing is written into the model directory"
    cache = digest_cache_file(files[0].resolve().parent)
    cache.write_bytes(b"\x00{not json")  # damaged: ignored and rewritten, never an error
    assert checkpoint_digest(d) == want and len(reads) == 2 * n
    assert json.loads(cache.read_text())["format"] == 1
    cache.write_text(json.dumps({"format": 1, "dir": str(cache), "files": {"x": 3}}))  # well-formed, wrong
    assert checkpoint_digest(d) == want
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # the cache dir cannot be created
    assert file_sha256s(files) == {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_same_size_corrupted_engine_file_is_refused(tiny_engine, tmp_path):
    """Same size, and the mtime put back after the overwrite: the sum cached while the file
    was intact must not be reused (the ctime moved)."""
    e = _aged_copy(tiny_engine.parent, tmp_path / "t") / tiny_engine.name
    data = e.parent / "tiny.onnx.data"
    file_sha256s([data])  # cached while intact
    st = data.stat()
    with open(data, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\x7f" * 4096)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.png")
    one_line_error(r, "tiny.onnx.data does not hold what the build wrote", "rebuild", "ladr-rt build")
    assert not (tmp_path / "o.png").exists()


def _drop(*keys):
    def edit(m):
        cur = m
        for k in keys[:-1]:
            cur = cur[k]
        del cur[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(m):
        cur = m
        for k in keys[:-1]:
            cur = cur[k]
        cur[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit,needle", [
    (_set(1, "format"), "older ladr-rt (manifest format 1"),
    (_set("2", "format"), "manifest format \"2\""),
    (_drop("build_args"), "field 'build_args' is missing"),
    (_drop("files"), "field 'files' is missing"),
    (_drop("model"), "field 'model' is missing"),
    (_set("48", "build_args", "height"), "field 'build_args.height' is \"48\" (a string), expected an integer"),
    (_set(True, "build_args", "batch"), "field 'build_args.batch' is true (a boolean), expected an integer"),
    (_set([], "build_args"), "field 'build_args' is a list, expected an object"),
    (_set({"tiny.onnx": 122, "tiny.onnx.data": 5}, "files"), "entry 'tiny.onnx' is 122"),
    (_set("f" * 63, "files", "tiny.onnx", "sha256"), "expected 64 hex digits"),
    (_set([2, 99], "io", "inputs", 0, "shape"), "field 'io' does not describe this engine's shape"),
    (_set(40, "build_args", "prompt_budget"),
     "field 'seq_len' is 54 (an integer), but build_args (height 48, width 80, prompt budget 40) give 62"),
    (_set("other", "name"), "field 'name' is \"other\" (a string), but the manifest file is tiny.json"),
    (_set("tensorrt", "runner"), "field 'runner' is \"tensorrt\" (a string), expected one of onnxruntime"),
    (_set({"compute_capability": 9}, "gpu"), "field 'gpu.compute_capability' is 9 (an integer)"),
])
def test_hand_edited_manifest_is_one_line_naming_file_field_and_rebuild(tiny_engine, tmp_path, edit, needle):
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(f"{tiny_engine}.json", d / "tiny.json")  # the manifest is refused before any file is read
    _edit_manifest(d / "tiny", edit)
    with pytest.raises(EngineError) as ei:
        read_manifest(d / "tiny")
    _one_line(ei.value, str(d / "tiny.json"), needle, "rebuild")
    assert not isinstance(ei.value, (KeyError, TypeError))


def test_hand_edited_manifest_through_the_cli(tiny_engine, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(f"{tiny_engine}.json", d / "tiny.json")
    _edit_manifest(d / "tiny", _drop("build_args", "height"))
    r = run_cli_inproc("generate", "--engine", d / "tiny", "--prompt", "x", "--out", tmp_path / "o.png")
    one_line_error(r, "tiny.json", "build_args.height", "rebuild")
    assert not (tmp_path / "o.png").exists()


def test_manifest_shapes_that_disagree_with_the_onnx_graph(tiny_engine, tiny_ckpt, tmp_path):
    """A manifest edited consistently to another prompt budget: internally coherent, but the
    graph's I/O is not what it says; the pipeline would size its buffers from it."""
    from ladr_rt.checkpoint import read_config
    from ladr_rt.config import ImageSpec
    from ladr_rt.tokens import SequenceLayout

    e = _copy_engine(tiny_engine, tmp_path / "t")
    seq = SequenceLayout(ImageSpec(TINY_SHAPE["height"], TINY_SHAPE["width"], 40), read_config(tiny_ckpt).layout)

    def edit(m):
        m["build_args"]["prompt_budget"] = 40
        m.update(seq_len=seq.seq_len, image_start=seq.image_start)
        for t in m["io"]["inputs"]:
            t["shape"] = [2, seq.seq_len]
    _edit_manifest(e, edit)
    r = run_cli_inproc("generate", "--engine", e, "--prompt", "x", "--device", "cpu", "--out", tmp_path / "o.png")
    one_line_error(r, "tiny.onnx has I/O", "input_ids [2, 54]", "manifest says", "rebuild")
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------ A9: interrupted and concurrent builds


def test_sigterm_mid_build_removes_the_temp_dir_and_restores_the_handler(tiny_ckpt, tmp_path, monkeypatch):
    seen = {}

    def export_then_sigterm(graph, path, *a, **k):
        seen["tmp"] = path.parent
        handler = signal.getsignal(signal.SIGTERM)
        # Without a handler of the build's own, SIGTERM would kill the test run: fail instead.
        assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None, previous), "no SIGTERM handler during build"
        assert (tmp_path / ".s.lock").exists()
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the build")

    def previous(signum, frame):  # what the caller had installed: must be back afterwards
        raise AssertionError("the build's handler was not in place")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        monkeypatch.setattr(b, "export_onnx", export_then_sigterm)
        r = run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "s", **SMALL), "--no-validate")
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert r.exit_code == 128 + signal.SIGTERM, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "nothing was installed" in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not seen["tmp"].exists() and _leftovers(tmp_path, "s") == []


def test_second_build_to_the_same_out_fails_in_one_line(tiny_ckpt, tmp_path):
    import fcntl

    lock = tmp_path / ".busy.lock"
    with open(lock, "w") as held:  # another process's build of engines/busy, in the middle of its work
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        r = run_cli_inproc(*build_args(tiny_ckpt, tmp_path / "busy", **SMALL))
        one_line_error(r, f"another build of {tmp_path / 'busy'} is running (pid 4242)", "another --out")
        assert sorted(p.name for p in tmp_path.iterdir()) == [".busy.lock"], "no temp dir, no output"


def test_next_build_removes_stale_temp_dirs_of_its_own_name_only(tiny_ckpt, tmp_path, monkeypatch):
    stale = tmp_path / ".k.build-ab12cd_9"
    (stale / "sub").mkdir(parents=True)
    (stale / "k.onnx.data").write_bytes(b"x" * 1000)
    (tmp_path / ".k.json.zz99yy88.json").write_text("{")
    (tmp_path / ".k.lock").write_text("999999\n")  # left by a SIGKILLed build: not locked by anyone
    foreign = [tmp_path / ".k2.build-ab12cd_9", tmp_path / ".k.build-x.build-ab12cd_9"]
    for f in foreign:
        f.mkdir()

    class Stop(Exception):
        pass

    def export_stops(graph, path, *a, **k):
        raise Stop

    monkeypatch.setattr(b, "export_onnx", export_stops)
    with pytest.raises(Stop):
        b.build(b.resolve_options(model=str(tiny_ckpt), out=str(tmp_path / "k"), validate=False, **SMALL),
                log=lambda s: None)
    assert not stale.exists() and not (tmp_path / ".k.json.zz99yy88.json").exists()
    assert all(f.is_dir() for f in foreign), "another engine's temp dirs are not this build's to remove"
    left = [n for n in _leftovers(tmp_path, "k") if n not in {f.name for f in foreign}]
    assert left == [], "the lock file is removed at the end of a build"


# ------------------------------------------------------------------ A10: suggestions and profiles


def test_mismatch_never_suggests_a_build_line_build_would_reject(tiny_engine, tmp_path):
    r = run_cli_inproc("generate", "--engine", tiny_engine, "--prompt", "x", "--width", 100, "--out",
                       tmp_path / "o.png")
    line = one_line_error(r, "built for width 80, this run asks for 100", "no engine can be built for that",
                          "--width 100 is not a positive multiple of 16")
    assert "ladr-rt build" not in line
    m = read_manifest(tiny_engine)
    for bad in ({"height": 0}, {"prompt_budget": 10**6}, {"batch": -1}):
        with pytest.raises(EngineError) as ei:
            check_manifest(m, **bad)
        assert "ladr-rt build" not in _one_line(ei.value, "no engine can be built for that")
    with pytest.raises(EngineError) as ei:
        check_manifest(m, weights_digest="0" * 64, height=64)
    _one_line(ei.value, "does not fit this run: it was built for height 48, this run asks for 64; the model's weights "
              "are not the ones it was built from; build one that does: `ladr-rt build", "--height 64")


@pytest.mark.parametrize("line,needle", [
    ('validate = "no"', "validate must be true or false (a TOML boolean, unquoted), got 'no' (a string)"),
    ("height = 48.0", "height must be an integer, got 48.0 (a number)"),
    ("height = true", "height must be an integer, got True (a boolean)"),
    ("precision = 16", "precision must be a string (in quotes), got 16 (an integer)"),
    ("workspace_gib = nan", "workspace_gib must be a positive, finite number of GiB"),
    ("workspace_gib = inf", "workspace_gib must be a positive, finite number of GiB"),
    ("workspace_gib = -1.0", "workspace_gib must be a positive, finite number of GiB"),
    ('keep_onnx = "yes"', "keep_onnx must be true or false"),
    ('timing_cache = ""', "timing_cache must be a path"),
])
def test_profile_values_are_type_checked(tiny_ckpt, tmp_path, line, needle):
    p = tmp_path / "p.toml"
    p.write_text(line + "\n")
    with pytest.raises(b.BuildError) as ei:
        b.resolve_options(str(p), model=str(tiny_ckpt), out=str(tmp_path / "x"))
    _one_line(ei.value, str(p), needle, "write it as")


def test_profile_type_error_through_the_cli_and_good_values(tiny_ckpt, tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('validate = "no"\n')
    one_line_error(run_cli_inproc("build", "--profile", p, "--model", tiny_ckpt, "--out", tmp_path / "x"),
                   "validate must be true or false", str(p))
    assert list(tmp_path.iterdir()) == [p]
    p.write_text("workspace_gib = 8\nvalidate = false\nkeep_onnx = true\nbackend = 'tensorrt'\n")  # int is a float
    o = b.resolve_options(str(p), model=str(tiny_ckpt), out=str(tmp_path / "x"))
    assert (o.workspace_gib, o.validate, o.keep_onnx) == (8, False, True)
    with pytest.raises(b.BuildError, match="--no-keep-onnx: an onnx engine is its NAME.onnx file"):
        b.resolve_options(model=str(tiny_ckpt), out=str(tmp_path / "x"), keep_onnx=False)


# ------------------------------------------------------------------ C2: margin-aware top-1


def test_bf16_top1_is_margin_aware_and_still_catches_a_wrong_engine(tiny_ckpt):
    """An engine whose only error is bf16 rounding (fp32 logits rounded to bf16) against bf16
    eager: the plain argmax check fails on exact/near ties, the margin-aware one passes; a
    wrong engine (codebook shifted by one, or picks moved to bad codes) still fails."""
    from ladr_rt.checkpoint import load_model, load_tokenizer, read_config
    from ladr_rt.config import ImageSpec
    from ladr_rt.engines.graph import EngineGraph
    from ladr_rt.tokens import SequenceLayout

    seq = SequenceLayout(ImageSpec(**TINY_SHAPE), read_config(tiny_ckpt).layout)
    inputs = b.validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)
    graphs = {p: EngineGraph.from_model(load_model(tiny_ckpt, dtype=dt), seq.seq_len, seq.image_positions)
              for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    eager = b.eager_references(graphs["bf16"], inputs, "bf16")
    emulated = [torch.from_numpy(r).bfloat16().float().numpy() for r in b.eager_references(graphs["fp32"], inputs,
                                                                                            "fp32")]
    tol = b.TOLERANCES["bf16"]
    strict = [b.compare(e, r) for e, r in zip(emulated, eager)]  # tie_rel 0: the old check
    assert min(m["top1"] for m in strict) < tol.top1, strict
    feed = iter(emulated)
    m = b.validate_with(lambda ids, mask: next(feed), inputs, eager, "bf16", "emulated bf16 engine")
    assert m["top1"] >= tol.top1 and m["top1_exact"] < tol.top1 and m["top1_near_ties"] > 0, m
    assert m["positions"] == 2 * 2 * seq.n_image

    shifted = [np.roll(r, 1, axis=-1) for r in eager]
    bad_picks = []
    for r in eager:
        x = r.copy()
        worst = x.argmin(-1)
        for i in range(0, x.shape[1], 5):  # a fifth of the positions pick the worst code
            x[:, i, worst[:, i]] = x[:, i].max(-1) + 1.0
        bad_picks.append(x)
    for wrong in (shifted, bad_picks):
        feed = iter(wrong)
        with pytest.raises(b.ValidationError, match="top-1 agreement"):
            b.validate_with(lambda ids, mask: next(feed), inputs, eager, "bf16", "wrong engine")


# ------------------------------------------------------------------ C1, C4, C5, C11: TensorRT on the CPU


class FakeTRT(types.ModuleType):
    """The slice of the TensorRT 10 Python API that build_plan uses, recording what it is told."""

    def __init__(self, plan=b"PLAN-BYTES", cache_bytes_ok=True, cache_matches=True):
        super().__init__("tensorrt")
        trt = self
        self.calls: list = []
        self.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda s, level: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", BF16="BF16")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Cache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"CACHE:" + self.data

        class Config:
            def __init__(self):
                self.flags = {"TF32"}  # TensorRT's default
                self.cache = None

            def set_memory_pool_limit(self, pool, n):
                trt.calls.append(("pool", pool, n))

            def clear_flag(self, f):
                self.flags.discard(f)

            def set_flag(self, f):
                self.flags.add(f)

            def create_timing_cache(self, data):
                if data and not cache_bytes_ok:
                    raise RuntimeError("invalid timing cache\nsecond line")
                return Cache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                if cache.data and not cache_matches:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, p):
                pass

        class Network:
            num_inputs = 0

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("network", flags))
                return Network()

            def create_builder_config(self):
                trt.config = Config()
                return trt.config

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda *a: None)

            def build_serialized_network(self, network, config):
                trt.calls.append(("built", sorted(config.flags)))
                return plan

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, p):
                trt.calls.append(("parse", p))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("bf16", True), ("fp16", True)])
def test_trt_fp32_plan_is_built_without_tf32(tmp_path, monkeypatch, precision, tf32):
    from ladr_rt.engines.trt import build_plan

    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build_plan(tmp_path / "g.onnx", tmp_path / "g.plan", precision, 2.0, None, log=lambda s: None)
    assert ("network", 1 << 1) in trt.calls  # strongly typed
    built = next(c[1] for c in trt.calls if c[0] == "built")
    assert ("TF32" in built) is tf32, built
    assert (tmp_path / "g.plan").read_bytes() == b"PLAN-BYTES"


def test_timing_cache_bad_or_unwritable_never_loses_the_plan(tmp_path, monkeypatch):
    from ladr_rt.engines.trt import build_plan

    logs: list[str] = []
    cache = tmp_path / "c" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"garbage")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT(cache_bytes_ok=False))
    build_plan(tmp_path / "g.onnx", tmp_path / "g.plan", "fp32", 1.0, cache, log=logs.append)
    assert "unreadable (invalid timing cache)" in logs[0] and cache.read_bytes() == b"CACHE:"  # fresh, rewritten
    logs.clear()
    trt = FakeTRT(cache_matches=False)  # another GPU's cache: refused by TensorRT, replaced
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache.write_bytes(b"other-gpu")
    build_plan(tmp_path / "g.onnx", tmp_path / "g.plan", "fp32", 1.0, cache, log=logs.append)
    assert "another GPU or TensorRT version" in logs[0]
    assert ("set_timing_cache", b"other-gpu", False) in trt.calls and cache.read_bytes() == b"CACHE:"
    logs.clear()
    (tmp_path / "plan-only").write_text("")
    build_plan(tmp_path / "g.onnx", tmp_path / "g2.plan", "fp32", 1.0, tmp_path / "plan-only" / "t.cache",
               log=logs.append)  # the cache's "directory" is a file: the write fails
    assert (tmp_path / "g2.plan").read_bytes() == b"PLAN-BYTES"
    assert len(logs) == 1 and "could not write the timing cache" in logs[0] and "plan is unaffected" in logs[0]


def test_timing_cache_path_is_relative_to_the_profile(tiny_ckpt, tmp_path, monkeypatch):
    prof = tmp_path / "profiles"
    prof.mkdir()
    (prof / "p.toml").write_text('backend = "tensorrt"\ntiming_cache = "caches/deep/t.cache"\n'
                                 f'model = "{os.path.relpath(tiny_ckpt, prof)}"\n')
    monkeypatch.chdir(tmp_path)  # not the profile's directory: the paths must not depend on it
    o = b.resolve_options(str(prof / "p.toml"), out=str(tmp_path / "e"))
    assert o.timing_cache == str((prof / "caches/deep/t.cache").resolve())
    assert o.model == str(tiny_ckpt.resolve())
    p = b._timing_cache_path(o)
    assert p.parent.is_dir(), "created before the (long) TensorRT build"


def test_tensorrt_build_on_cpu_with_fakes(tiny_ckpt, tmp_path, monkeypatch):
    """The whole --backend tensorrt path with a fake TensorRT: the model is freed before any
    runner exists (weakref), validation compares against the stored references with the same
    metrics a direct eager-vs-onnxruntime comparison gives, fp32 clears TF32, the timing
    cache's missing directory is created, and without --keep-onnx the ONNX files are neither
    installed nor listed."""
    import ladr_rt.checkpoint as ck
    import ladr_rt.engines.trt as trtmod

    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(b, "_build_device", lambda opts, device: torch.device("cpu"))
    monkeypatch.setattr(b, "_gpu_info", lambda dev: {"name": "Fake GPU", "compute_capability": "9.0"})
    models = []
    real_load = ck.load_model
    monkeypatch.setattr(ck, "load_model", lambda *a, **k: models.append(weakref.ref(m := real_load(*a, **k))) or m)
    real_ort = b.ort_runner
    freed = []

    def ort_runner(path, dev, precision="fp32"):
        freed.append(models[0]() is None)
        return real_ort(path, dev, precision)

    def plan_runner(plan, rows, L, N, K, dev):
        freed.append(models[0]() is None)
        assert plan.read_bytes() == b"PLAN-BYTES"
        return real_ort(plan.parent / f"{plan.stem}.onnx", dev)  # the "plan" computes what the graph does

    monkeypatch.setattr(b, "ort_runner", ort_runner)
    monkeypatch.setattr(trtmod, "plan_runner", plan_runner)
    (tmp_path / "e").mkdir()
    opts = b.BuildOptions(model=str(tiny_ckpt), out=str(tmp_path / "e" / "t"), backend="tensorrt",
                          timing_cache=str(tmp_path / "no" / "such" / "dir" / "t.cache"), **SMALL)
    b.build(opts, log=lambda s: None)
    assert freed == [True, True], "model still alive while an engine runner was created"
    assert next(c[1] for c in trt.calls if c[0] == "built") == [], "fp32 plan built with TF32"
    assert (tmp_path / "no/such/dir/t.cache").read_bytes() == b"CACHE:"
    m = read_manifest(tmp_path / "e" / "t")
    assert sorted(m["files"]) == ["t.plan"] and m["build_args"]["keep_onnx"] is False
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["t.json", "t.plan"]
    assert m["gpu"]["compute_capability"] == "9.0" and m["runner"] == "tensorrt"
    assert build_command(m).endswith(f"--backend tensorrt --out {tmp_path / 'e' / 't'}")
    assert build_command({**m, "build_args": {**m["build_args"], "keep_onnx": True}}).endswith("--keep-onnx")
    # Parity metrics as a direct comparison gives them: references stored before the export
    # are the eager model's logits.
    from ladr_rt.checkpoint import load_model, load_tokenizer, read_config
    from ladr_rt.config import ImageSpec
    from ladr_rt.engines.graph import EngineGraph
    from ladr_rt.tokens import SequenceLayout

    seq = SequenceLayout(ImageSpec(**SMALL), read_config(tiny_ckpt).layout)
    inputs = b.validation_inputs(load_tokenizer(tiny_ckpt), seq, 1)
    graph = EngineGraph.from_model(load_model(tiny_ckpt), seq.seq_len, seq.image_positions)
    with torch.inference_mode():
        direct = [graph(i, k).numpy() for i, k in inputs]
    for key in ("onnxruntime", "tensorrt"):
        v = m["validation"][key]
        assert v["positions"] == 2 * 2 * seq.n_image and v["top1"] == 1.0
        assert v["max_abs_err"] < 1e-4
    refs = b.eager_references(graph, inputs, "fp32")
    assert all(np.array_equal(a, r) for a, r in zip(direct, refs))


# ------------------------------------------------------------------ C1, C6: onnxruntime CUDA, faked


class FakeORT(types.ModuleType):
    def __init__(self, started=None, raises=None):
        super().__init__("onnxruntime")
        ort = self
        self.sessions: list = []
        self.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)
        self.SessionOptions = lambda: types.SimpleNamespace()
        self.get_available_providers = lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]

        class Arg:
            def __init__(self, name, shape, t):
                self.name, self.shape, self.type = name, shape, t

        class Session:
            def __init__(self, path, sess_options=None, providers=None):
                if raises:
                    raise RuntimeError(raises)
                ort.sessions.append(providers)
                names = [p if isinstance(p, str) else p[0] for p in providers]
                self._providers = started if started is not None else names + ["CPUExecutionProvider"]

            def get_providers(self):
                return self._providers

            def get_inputs(self):
                return [Arg("input_ids", [2, 54], "tensor(int32)"), Arg("key_mask", [2, 54], "tensor(bool)")]

            def get_outputs(self):
                return [Arg("logits", [2, 15, 8192], "tensor(float)")]

            def io_binding(self):
                return None

        self.InferenceSession = Session


def test_fp32_engine_on_ort_cuda_gets_tf32_off_and_its_device_id(tiny_engine, monkeypatch):
    import ladr_rt.engines.ort as ortmod
    from ladr_rt.engines import load_denoiser

    fake = FakeORT()
    monkeypatch.setattr(ortmod, "import_ort", lambda: fake)
    den = load_denoiser(read_manifest(tiny_engine), "cuda:1")
    assert fake.sessions[-1] == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"})]
    assert den.device == torch.device("cuda", 1)
    ortmod.OrtDenoiser(f"{tiny_engine}.onnx", "cuda:0", tf32=None)  # not fp32: onnxruntime's default
    assert fake.sessions[-1] == [("CUDAExecutionProvider", {"device_id": "0"})]


def test_eager_fp32_references_run_without_tf32(monkeypatch):
    seen = []

    class Probe(torch.nn.Module):
        head = torch.zeros(1)

        def forward(self, ids, mask):
            seen.append([k.fp32_precision for k in b._precision_knobs()])
            return torch.zeros(1)

    knobs = b._precision_knobs()
    if not knobs:
        pytest.skip("torch < 2.9: the legacy allow_tf32 flags are used instead")
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "tf32"
        inputs = [(torch.zeros(1), torch.zeros(1))]
        b.eager_references(Probe(), inputs, "fp32")
        b.eager_references(Probe(), inputs, "bf16")
        assert seen == [["ieee"] * len(knobs), ["tf32"] * len(knobs)]
        assert [k.fp32_precision for k in knobs] == ["tf32"] * len(knobs), "restored"
    finally:
        for k, v in zip(knobs, saved):
            k.fp32_precision = v


@pytest.mark.parametrize("started,raises,needle", [
    (["CPUExecutionProvider"], None, "did not start CUDAExecutionProvider"),
    (None, "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open",
     "could not start its CUDA provider"),
])
def test_ort_cuda_provider_that_fails_to_start_is_refused(tiny_engine, monkeypatch, started, raises, needle):
    import ladr_rt.engines.ort as ortmod

    monkeypatch.setattr(ortmod, "import_ort", lambda: FakeORT(started=started, raises=raises))
    with pytest.raises(EngineError) as ei:
        ortmod.OrtDenoiser(f"{tiny_engine}.onnx", "cuda:0")
    msg = _one_line(ei.value, needle, "CUDA/cuDNN libraries", "--device cpu")
    assert "truncated" not in msg
