"""The hostile-user sweep: every class of bad input issue 12 found, as real `ladr-rt` processes.

    python tests/hostile_sweep.py [--jobs 2] [--json sweep.json] [--section all|cli|server] [-k 'A|B']

The server section (``server_cases``) runs each case as a real `ladr-rt serve` process on
127.0.0.1 and classifies it as described above ``ServerCase`` (adds hang and crash).

Not a pytest module (the per-case tests are tests/test_hostile_*.py, in-process and fast); this
runs each case as its own subprocess, the way a user meets it, and counts the outcomes:

    clear      exit != 0, stderr one line, no traceback          (what a bad input must get)
    ok         exit 0 and the result checked correct             (a good or edge input)
    traceback  a Python traceback on stderr
    multiline  exit != 0 but more than one stderr line
    silent     exit 0 on an input that must be refused, or a wrong result
    leftover   a temp file/dir or partial output left behind, or a user file changed or gone

It ends with one JSON line; exit 1 unless every case is clear or ok.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

CLI = [sys.executable, "-m", "ladr_rt.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--height", "32", "--width", "32", "--steps", "3", "--no-progress"]


@dataclass
class Case:
    name: str
    cls: str  # issue 12's defect class
    args: Callable[[Path], list[str]]  # workdir -> argv after `ladr-rt`
    expect: str = "error"  # "error" or "ok"
    check: Callable[[Path], str | None] | None = None  # after an ok run: None if right, else what is wrong
    setup: Callable[[Path], None] | None = None
    signal_after: float | None = None  # send SIGTERM this many seconds after start


def run_case(case: Case, base: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="case-", dir=base))
    if case.setup:
        case.setup(work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file() and not p.is_symlink()
              and p.stat().st_size < 1 << 20}
    argv = case.args(work)
    t0 = time.monotonic()
    p = subprocess.Popen(CLI + argv, cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if case.signal_after is not None:
        time.sleep(case.signal_after)
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=600)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("Warning", "warnings.warn"))]
    res = {"name": case.name, "class": case.cls, "rc": p.returncode, "stderr": err.strip()[-400:],
           "seconds": round(time.monotonic() - t0, 2)}
    if "Traceback" in err:
        res["outcome"] = "traceback"
    elif p.returncode != 0:
        # A process stopped by SIGTERM before its handler was installed says nothing, and has done nothing.
        n_ok = len(lines) == 1 or (case.signal_after is not None and len(lines) == 0)
        res["outcome"] = "clear" if n_ok and case.expect == "error" else ("multiline" if not n_ok else "silent")
        if case.expect == "ok":
            res["outcome"] = "silent"  # a good input refused is a wrong answer too
    else:
        wrong = case.check(work) if case.check else None
        res["outcome"] = "ok" if case.expect == "ok" and wrong is None else "silent"
        if wrong:
            res["wrong"] = wrong
    hidden = [str(q.relative_to(work)) for q in work.rglob(".*")]
    changed = [str(q.relative_to(work)) for q, b in before.items() if not q.is_file() or q.read_bytes() != b]
    if case.expect == "error":
        changed = [c for c in changed if not c.startswith("engines/.")]
    if hidden or (changed and case.expect == "error"):
        res["outcome"] = "leftover"
        res["left"] = hidden + changed
    shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- fixtures

def make_fixtures(base: Path) -> dict[str, Path]:
    tiny = base / "tiny"
    subprocess.run(CLI + ["init-tiny", str(tiny)], check=True, env=ENV, capture_output=True)
    eng = base / "engines"
    eng.mkdir()
    r = subprocess.run(CLI + ["build", "--model", str(tiny), "--height", "32", "--width", "32", "--prompt-budget", "24",
                              "--precision", "fp32", "--backend", "onnx", "--out", str(eng / "e")],
                       env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fixture build failed: {r.stderr}")
    return {"tiny": tiny, "engine": eng / "e"}


from test_hostile_inputs import link_copy as linked  # noqa: E402  (tests/ is this script's directory)
from test_hostile_inputs import own  # noqa: E402
from serve_proc import (LEFT_THE_QUEUE, TOOK_ITS_PLACE, answer, error_of, hang_up_behind_the_head,  # noqa: E402
                        one_running_one_queued, problems)


def owned(f: Path) -> Path:
    return own(f.parent, f.name)


def cases(fx: dict[str, Path]) -> list[Case]:
    tiny, engine = fx["tiny"], fx["engine"]
    gen = ["generate", "--model", str(tiny), "--prompt", "a red circle"]

    def png(size=(32, 32), name="o.png"):
        def check(w: Path):
            from PIL import Image

            f = w / name
            if not f.is_file():
                return f"{name} missing"
            im = Image.open(f)
            return None if im.size == size else f"size {im.size}, expected {size}"
        return check

    out: list[Case] = []
    # --- options (class 3, 4, 10)
    bad_opts = {"--steps": ["0", "-1", "x", "1e9", "99999999999999999999", "1.5"],
                "--cfg": ["nan", "inf", "-inf", "-1", "x", ""], "--temperature": ["nan", "inf", "-1", "x"],
                "--seed": ["-1", str(2**64), str(2**70), "x"], "--height": ["0", "-16", "17", "100000", "x"],
                "--width": ["0", "100", "-32"], "--prompt-budget": ["0", "-1", "1000000000", "1"],
                "--sampler": ["", "LADR", "fast"], "--device": ["gpu", "meta", "cuda:99", "cuda", ""],
                "--dtype": ["int8", ""]}  # fp8 is a precision now (docs/fp8.md)
    for opt, vals in bad_opts.items():
        for v in vals:
            out.append(Case(f"{opt} {v!r}", "options", lambda w, o=opt, v=v: gen + SMALL + [o, v, "--out", "o.png"]))
    for opt, v in [("--cfg", "0"), ("--temperature", "0"), ("--seed", str(2**63 - 1)), ("--steps", "1"),
                   ("--sampler", "prophet"), ("--sampler", "threshold"), ("--sampler", "baseline")]:
        out.append(Case(f"edge {opt} {v}", "options", lambda w, o=opt, v=v: gen + SMALL + [o, v, "--out", "o.png"],
                        "ok", png()))
    # --- prompts (class 5, 10)
    for p in ["", "   ", "\t\n"]:
        out.append(Case(f"prompt {p!r}", "prompts", lambda w, p=p: ["generate", "--model", str(tiny), "--prompt", p]
                        + SMALL + ["--out", "o.png"]))
    out.append(Case("prompt over budget", "prompts", lambda w: gen[:-1] + ["red " * 60, "--prompt-budget", "24"]
                    + SMALL[:4] + ["--out", "o.png"]))
    for p in ["<uncondition>", "</user><system>", "<|mdm_mask|>", "a\x01cat", "🐱", "{prompt}", "%s"]:
        out.append(Case(f"prompt {p!r}", "prompts", lambda w, p=p: ["generate", "--model", str(tiny), "--prompt", p]
                        + SMALL + ["--out", "o.png"], "ok", png()))
    # --- config.json (class 3, 6)
    mutations = {"n_heads 0": ("n_heads", 0), "n_heads true": ("n_heads", True), "n_heads 3": ("n_heads", 3),
                 "d_model str": ("d_model", "32"), "n_layers 1e12": ("n_layers", 10**12), "n_layers 0": ("n_layers", 0),
                 "n_kv_heads 3": ("n_kv_heads", 3), "rope_theta -1": ("rope_theta", -1),
                 "rope_theta 0": ("rope_theta", 0), "rms_norm_eps nan": ("rms_norm_eps", float("nan")),
                 "vocab 1000": ("vocab_size", 1000), "default cfg nan": ("ladr_default_cfg", "nan"),
                 "default cfg -1": ("ladr_default_cfg", -1), "default size str": ("ladr_default_size", "big"),
                 "default size 50": ("ladr_default_size", [50, 50]), "default size 3 dims": ("ladr_default_size", [1, 2, 3]),
                 "layout list": ("ladr_layout", [1]), "layout typo": ("ladr_layout", {"image_ofset": 3}),
                 "layout vq_scale 0": ("ladr_layout", {"vq_scale": 0}), "layout codebook 0": ("ladr_layout", {"codebook": 0}),
                 "layout mask in codes": ("ladr_layout", {"mask": 126400}),
                 "layout offset past vocab": ("ladr_layout", {"image_offset": 134000}),
                 "layout template": ("ladr_layout", {"cond_template": "{nope}"}),
                 "include_bias": ("include_bias", True), "weight_tying str": ("weight_tying", "no"),
                 "mlp_ratio 1e30": ("mlp_ratio", 1e30)}
    for name, (k, v) in mutations.items():
        def setup(w, k=k, v=v):
            d = linked(tiny, w / "m")
            f = owned(d / "config.json")
            c = json.loads(f.read_text())
            c[k] = v
            if k == "vocab_size":
                c.pop("embedding_size", None)
            if k == "mlp_ratio":
                c.pop("mlp_hidden_size", None)
            f.write_text(json.dumps(c))
        out.append(Case(f"config {name}", "config", lambda w: ["generate", "--model", str(w / "m"), "--prompt", "a cat"]
                        + SMALL + ["--out", "o.png"], setup=setup))
    for name, text in [("config not JSON", "{"), ("config empty", ""), ("config a list", "[]"),
                       ("config binary", "\x00\xff")]:
        def setup(w, text=text):
            d = linked(tiny, w / "m")
            owned(d / "config.json").write_text(text, errors="surrogateescape")
        out.append(Case(name, "config", lambda w: ["generate", "--model", str(w / "m"), "--prompt", "a cat"] + SMALL
                        + ["--out", "o.png"], setup=setup))
    # --- checkpoint files (class 6)
    def shard(w):
        return sorted((w / "m").glob("model-*.safetensors"))[0]

    damage = {
        "truncated shard": lambda w: owned(shard(w)).write_bytes(shard(w).read_bytes()[:1000]),
        "empty shard": lambda w: owned(shard(w)).write_bytes(b""),
        "random shard": lambda w: owned(shard(w)).write_bytes(os.urandom(5000)),
        "shard missing": lambda w: shard(w).unlink(),
        "index not JSON": lambda w: owned(w / "m" / "model.safetensors.index.json").write_text("{x"),
        "index no weight_map": lambda w: owned(w / "m" / "model.safetensors.index.json").write_text("{}"),
        "index outside": lambda w: owned(w / "m" / "model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "/etc/passwd"}}'),
        "index dotdot": lambda w: owned(w / "m" / "model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "../x.safetensors"}}'),
        "tokenizer missing": lambda w: [(w / "m" / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        "tokenizer garbage": lambda w: owned(w / "m" / "tokenizer.json").write_text("{garbage"),
        "vqvae missing": lambda w: shutil.rmtree(w / "m" / "vqvae"),
        "vqvae weights missing": lambda w: (w / "m" / "vqvae" / "diffusion_pytorch_model.safetensors").unlink(),
        "vqvae config not JSON": lambda w: (w / "m" / "vqvae" / "config.json").write_text("{"),
        "vqvae config wrong": lambda w: (w / "m" / "vqvae" / "config.json").write_text('{"block_out_channels": 5}'),
        "vqvae unknown class": lambda w: (w / "m" / "vqvae" / "config.json").write_text('{"_class_name": "Foo"}'),
        "pickle only": lambda w: ([f.unlink() for f in (w / "m").glob("model*")],
                                  (w / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04x")),
        "model dir is a file": lambda w: (shutil.rmtree(w / "m"), (w / "m").write_text("x")),
    }
    for name, fn in damage.items():
        def setup(w, fn=fn):
            linked(tiny, w / "m")
            fn(w)
        out.append(Case(f"checkpoint {name}", "checkpoint", lambda w: ["generate", "--model", str(w / "m"), "--prompt",
                                                                      "a cat"] + SMALL + ["--out", "o.png"], setup=setup))
    out.append(Case("checkpoint symlinked (HF cache)", "checkpoint", lambda w: ["generate", "--model", str(w / "m"),
               "--prompt", "a cat"] + SMALL + ["--out", "o.png"], "ok", png(), setup=lambda w: linked(tiny, w / "m")))

    def nan_weights(w):
        import torch
        from safetensors.torch import load_file, save_file

        d = linked(tiny, w / "m")
        for f in d.glob("model-*.safetensors"):
            sd = load_file(str(f))
            if any("wte" in k for k in sd):
                sd = {k: (torch.full_like(v, float("nan")) if "wte" in k else v) for k, v in sd.items()}
                f.unlink()
                save_file(sd, str(f))
    out.append(Case("checkpoint NaN weights", "checkpoint", lambda w: ["generate", "--model", str(w / "m"), "--prompt",
                                                                      "a cat"] + SMALL + ["--out", "o.png"],
                    setup=nan_weights))
    # --- outputs (class 7)
    for name, args in [("out /proc", ["--out", "/proc/x.png"]), ("out /dev/null", ["--out", "/dev/null"]),
                       ("out dir", ["--out", "."]), ("out missing dir", ["--out", "no/o.png"]),
                       ("out .jpq", ["--out", "o.jpq"]), ("out no suffix", ["--out", "o"]),
                       ("trace /proc", ["--trace", "/proc/t.json", "--out", "o.png"]),
                       ("tokens /sys", ["--save-tokens", "/sys/t.npy", "--out", "o.png"]),
                       ("same out+trace", ["--out", "o.png", "--trace", "o.png"]),
                       ("same out+tokens", ["--out", "o.png", "--save-tokens", "./o.png"]),
                       ("same tokens+trace", ["--out", "o.png", "--save-tokens", "t", "--trace", "t"])]:
        out.append(Case(name, "outputs", lambda w, a=args: gen + SMALL + a))
    out.append(Case("out .jpg", "outputs", lambda w: gen + SMALL + ["--out", "o.jpg"], "ok", png(name="o.jpg")))
    out.append(Case("out over an old file", "outputs", lambda w: gen + SMALL + ["--out", "o.png", "--trace", "t.json",
                    "--save-tokens", "c.npy"], "ok", png(), setup=lambda w: (w / "o.png").write_bytes(b"old")))
    # --- init-tiny (class 1)
    def user_dir(w):
        (w / "d").mkdir()
        (w / "d" / "thesis.tex").write_text("precious")
    out.append(Case("init-tiny over user files", "user data", lambda w: ["init-tiny", str(w / "d")], setup=user_dir))
    out.append(Case("init-tiny over a file", "user data", lambda w: ["init-tiny", str(w / "f")],
                    setup=lambda w: (w / "f").write_text("x")))
    for a in (["--layers", "0"], ["--d-model", "12"], ["--seed", "-5"], ["--d-model", "999999"]):
        out.append(Case(f"init-tiny {' '.join(a)}", "user data", lambda w, a=a: ["init-tiny", str(w / "t")] + a))
    # --- engines (class 8, 10)
    egen = ["generate", "--engine", str(engine), "--prompt", "a red circle", "--steps", "3", "--no-progress",
            "--out", "o.png"]
    out.append(Case("engine ok", "engines", lambda w: egen + ["--temperature", "0"], "ok", png()))
    for name, a in [("engine other height", ["--height", "64"]), ("engine height 0", ["--height", "0"]),
                    ("engine width 100", ["--width", "100"]), ("engine budget 0", ["--prompt-budget", "0"]),
                    ("engine dtype", ["--dtype", "bf16"]), ("engine missing", None)]:
        if a is None:
            out.append(Case(name, "engines", lambda w: ["generate", "--engine", str(w / "nope"), "--prompt", "x"]))
        else:
            out.append(Case(name, "engines", lambda w, a=a: egen + a))

    def engine_copy(edit):
        def setup(w):
            e = w / "engines"
            e.mkdir()
            for f in engine.parent.glob("e.*"):
                shutil.copy(f, e / f.name)
            edit(e)
        return setup

    def manifest_edit(fn):
        def edit(e):
            m = json.loads((e / "e.json").read_text())
            fn(m)
            (e / "e.json").write_text(json.dumps(m))
        return edit

    def flip_data(e):
        f = e / "e.onnx.data"
        b = bytearray(f.read_bytes())
        for i in range(0, len(b), 4096):
            b[i] ^= 0xFF
        f.write_bytes(bytes(b))

    edits = {"manifest not JSON": lambda e: (e / "e.json").write_text("{"),
             "manifest empty object": lambda e: (e / "e.json").write_text("{}"),
             "manifest no build_args": manifest_edit(lambda m: m.pop("build_args")),
             "manifest no files": manifest_edit(lambda m: m.pop("files")),
             "manifest files a list": manifest_edit(lambda m: m.__setitem__("files", [1])),
             "manifest height str": manifest_edit(lambda m: m["build_args"].__setitem__("height", "32")),
             "manifest shape lies": manifest_edit(lambda m: m["build_args"].__setitem__("height", 64)),
             "manifest model gone": manifest_edit(lambda m: m.pop("model")),
             "manifest runner unknown": manifest_edit(lambda m: m.__setitem__("runner", "magic")),
             "onnx data same-size corrupt": flip_data,
             "onnx data truncated": lambda e: (e / "e.onnx.data").write_bytes((e / "e.onnx.data").read_bytes()[:100]),
             "onnx missing": lambda e: (e / "e.onnx").unlink()}
    for name, edit in edits.items():
        out.append(Case(name, "engines", lambda w: ["generate", "--engine", str(w / "engines" / "e"), "--prompt", "x",
                                                    "--steps", "2", "--no-progress", "--out", "o.png"],
                        setup=engine_copy(edit)))

    def stale_weights(w):
        import torch
        from safetensors.torch import load_file, save_file

        d = w / "m"
        shutil.copytree(tiny, d)
        for f in d.glob("model-*.safetensors"):
            sd = load_file(str(f))
            k = next((k for k in sd if "wte" in k), None)
            if k:
                sd[k][1000:9000] += 1.0  # about 1 MB of embeddings changed, same size
                f.unlink()
                save_file(sd, str(f))
    out.append(Case("engine stale weights", "engines", lambda w: ["generate", "--engine", str(engine), "--model",
                    str(w / "m"), "--prompt", "x", "--steps", "2", "--no-progress", "--out", "o.png"],
                    setup=stale_weights))
    # --- build (class 9, 10)
    bld = ["build", "--model", str(tiny), "--height", "32", "--width", "32", "--prompt-budget", "24", "--out"]
    for name, a in [("build height 0", ["--height", "0"]), ("build width 100", ["--width", "100"]),
                    ("build batch 0", ["--batch", "0"]), ("build profile missing", ["--profile", "nope.toml"])]:
        out.append(Case(name, "build", lambda w, a=a: bld + [str(w / "engines" / "b")] + a,
                        setup=lambda w: (w / "engines").mkdir()))
    for name, text in [("profile validate str", 'validate = "no"\n'), ("profile height str", 'height = "32"\n'),
                       ("profile bad toml", "height = \n"), ("profile unknown key", "heigth = 32\n"),
                       ("profile workspace nan", "workspace_gib = nan\n")]:
        def setup(w, text=text):
            (w / "engines").mkdir()
            (w / "p.toml").write_text(text)
        out.append(Case(name, "build", lambda w: bld + [str(w / "engines" / "b"), "--profile", str(w / "p.toml")],
                        setup=setup))
    out.append(Case("build SIGTERM midway", "signals", lambda w: bld + [str(w / "engines" / "b")],
                    setup=lambda w: (w / "engines").mkdir(), signal_after=4.0))
    out.append(Case("generate SIGTERM midway", "signals", lambda w: ["generate", "--model", str(tiny), "--prompt", "x",
                    "--sampler", "baseline", "--steps", "10000", "--height", "32", "--width", "32", "--no-progress",
                    "--out", "o.png"], signal_after=4.0))
    return out


# =========================================================================== the server section
#
# Each case is a real `ladr-rt serve` process on 127.0.0.1 (an ephemeral port), driven by raw
# sockets (tests/serve_proc.py), then stopped by SIGTERM (or the case's own signal). Outcomes:
#
#     clear      an option refused in one line before listening, or a bad request answered with
#                its status in the OpenAI error shape, the server's log quiet
#     ok         a good request answered 200 with a right image
#     traceback  a traceback (or "Exception in ...", "never retrieved") in the server's stderr
#     multiline  a refusal in more than one line, or the server's log grew past one line per cause
#     silent     the wrong status (a 500, a 200 for a bad request, a 429 that can never succeed)
#     leftover   the port still bound, or a child process left, after the server exited
#     hang       no answer, or no exit, within the case's bound
#     crash      the server died by a signal (SIGBUS, SIGABRT) or exited by itself

SERVER_OUTCOMES = ("clear", "ok", "traceback", "multiline", "silent", "leftover", "hang", "crash")
FAST = ["--height", "64", "--width", "64", "--steps", "4"]
# 64 steps of ~1 s (512x512 here): a request holds its slot while others queue behind it;
# requests that only need an answer ask for 1 step
SLOW_STEP = ["--mode", "sequential", "--height", "512", "--width", "512", "--steps", "64"]


@dataclass
class ServerCase:
    name: str
    cls: str  # bodies, auth, queue, disconnects, signals, options, faults
    args: list  # serve options after --model (strings; "{tiny}" / "{engine}" / "{copy}" filled in)
    drive: Callable | None = None  # (ServeProc, workdir) -> None if the answers were right, else what was wrong
    expect: str = "error"  # "error" (refused / error answers) or "ok"
    env: dict | None = None
    stop: int | None = signal.SIGTERM  # None: drive stopped it
    bound: float = 120  # seconds the whole case may take before it is a hang
    model: str = "{tiny}"  # None: no --model


def _status(*want, param="-", code=None, retry=False, shape=True):
    """A drive: send ``body`` (set by the case) and check the answer's status and error shape."""
    def check(answer_):
        st, h, body = answer_
        if st not in want:
            return f"status {st}, expected {want}: {body[:160]!r}"
        if st >= 400 and shape:
            try:
                e = error_of(st, h, body)
            except Exception as x:  # noqa: BLE001
                return f"status {st} without the OpenAI error shape ({type(x).__name__}): {body[:160]!r}"
            if param != "-" and e["param"] != param:
                return f"param {e['param']!r}, expected {param!r}"
            if code is not None and e["code"] != code:
                return f"code {e['code']!r}, expected {code!r}"
            if retry and "retry-after" not in h:
                return "no Retry-After"
        return None
    return check


def _send(body, *checks, headers=None, content_length=True):
    def drive(s, w):
        a = s.request(body, headers=headers, content_length=content_length, timeout=60)
        for c in checks:
            wrong = c(a)
            if wrong:
                return wrong
        return None
    return drive


def _image_ok(size=64):
    def check(a):
        st, _, body = a
        if st != 200:
            return f"status {st}: {body[:160]!r}"
        import base64
        import io

        from PIL import Image

        items = json.loads(body)["data"]
        im = Image.open(io.BytesIO(base64.b64decode(items[0]["b64_json"])))
        return None if im.size == (size, size) else f"image {im.size}, expected {size}x{size}"
    return check


def _queue_not_head(s, w):
    try:
        clients = hang_up_behind_the_head(s)
    except AssertionError as e:  # a wait that tests the server failed: a wrong answer, not a hang
        if LEFT_THE_QUEUE in str(e):
            return "a queued client's hang-up left its request in the queue"
        if TOOK_ITS_PLACE in str(e):
            return "the next client was refused although a place was free"
        raise
    for k in clients:
        k.close()
    s.until(lambda: s.metric("ladr_rt_busy_slots") == 0 and s.metric("ladr_rt_queue_depth") == 0, timeout=30,
            what="hung-up requests freed")
    return None


def _queue_full(s, w):
    a, b = one_running_one_queued(s)
    wrong = _status(429, code="queue_full", retry=True)(s.request({"prompt": "c", "steps": 1}))
    a.close()
    b.close()
    return wrong


def _hang_up(when):
    def drive(s, w):
        if when == "upload":
            k = s.send(b'{"prompt": "a', headers={"Content-Length": "200"}, content_length=False)
            time.sleep(0.5)
            k.close()
        else:
            first = s.send({"prompt": "a"})
            s.until(lambda: s.metric("ladr_rt_busy_slots") == 1, what="a running")
            k = first
            if when == "queued":
                k = s.send({"prompt": "b"})
                s.until(lambda: s.metric("ladr_rt_queue_depth") == 1, what="b queued")
            k.close()
            if k is not first:
                first.close()
        try:
            s.until(lambda: s.metric("ladr_rt_busy_slots") == 0 and s.metric("ladr_rt_queue_depth") == 0,
                    timeout=30, what="the slot to be freed")
        except AssertionError:
            return "a hung-up client's request kept its slot or place"
        return _image_ok(512)(s.request({"prompt": "after", "steps": 1}))
    return drive


def _stalled_headers(s, w):
    k = s.connect()
    k.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    s._keep = k
    return None


def _stalled_upload(s, w):
    k = s.send(b'{"prompt": "x"', headers={"Content-Length": "100"}, content_length=False)
    s._keep = k
    return None


def _drain(n_queued):
    def drive(s, w):
        st = s.request({"prompt": "warm up", "seed": 0, "steps": 1})[0]
        if st != 200:
            return f"warm-up status {st}"
        s._socks = [s.send({"prompt": f"p{i}", "seed": i}) for i in range(n_queued + 1)]
        s.until(lambda: s.metric("ladr_rt_queue_depth") == n_queued, what="queued")
        return None
    return drive


def _long_step(s, w):
    s._socks = [s.send({"prompt": "x"})]
    s.until(lambda: s.metric("ladr_rt_busy_slots") == 1, what="running")
    time.sleep(0.5)
    return None


def _truncate(how):
    def drive(s, w):
        model = w / "m"
        if how == "truncate":
            for f in model.rglob("*.safetensors"):
                os.truncate(f, 0)
        elif how == "delete":
            shutil.rmtree(model)
        elif how == "rewrite":
            for f in model.glob("model-*.safetensors"):
                f.write_bytes(os.urandom(1000))
        return _image_ok(64)(s.request({"prompt": "a red circle"}))
    return drive


def server_cases(fx: dict[str, Path]) -> list[ServerCase]:
    C = ServerCase
    out: list[ServerCase] = []
    # --- bodies: each a 400 (413) naming its field, never a 500
    deep = b'{"prompt": "x", "user": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    bodies = [
        ("not JSON", b'{"prompt": "a"', 400, None), ("NaN", b'{"prompt": "a", "cfg": NaN}', 400, None),
        ("Infinity", b'{"prompt": "a", "cfg": -Infinity}', 400, None),
        ("cfg 1e400", b'{"prompt": "a", "cfg": 1e400}', 400, "cfg"), ("a list", b'["a"]', 400, None),
        ("nested 20000 deep", deep, 400, None), ("invalid UTF-8", b'{"prompt": "\xff\xfe"}', 400, None),
        ("int of 5000 digits", b'{"prompt": "a", "n": ' + b"9" * 5000 + b"}", 400, None),
        ("size non-ASCII digits", {"prompt": "a", "size": "\u0665\u0661\u0662x64"}, 400, "size"),
        ("size fullwidth digits", {"prompt": "a", "size": "\uff16\uff14x64"}, 400, "size"),
        ("size 5000-digit width", {"prompt": "a", "size": "9" * 5000 + "x64"}, 400, "size"),
        ("size 0x0", {"prompt": "a", "size": "0x0"}, 400, "size"), ("size 64x64x64", {"prompt": "a", "size": "64x64x64"}, 400, "size"),
        ("cfg 1e300", {"prompt": "a", "cfg": 1e300}, 400, "cfg"), ("cfg -1", {"prompt": "a", "cfg": -1}, 400, "cfg"),
        ("cfg string", {"prompt": "a", "cfg": "4"}, 400, "cfg"), ("n 0", {"prompt": "a", "n": 0}, 400, "n"),
        ("n 1e6", {"prompt": "a", "n": 1000000}, 400, "n"), ("n true", {"prompt": "a", "n": True}, 400, "n"),
        ("seed -1", {"prompt": "a", "seed": -1}, 400, "seed"), ("seed 2**64", {"prompt": "a", "seed": 2**64}, 400, "seed"),
        ("steps 10**9", {"prompt": "a", "steps": 10**9}, 400, "steps"), ("no prompt", {}, 400, "prompt"),
        ("prompt empty", {"prompt": " "}, 400, "prompt"), ("prompt a list", {"prompt": ["a"]}, 400, "prompt"),
        ("prompt over budget", {"prompt": "red " * 200}, 400, "prompt"), ("unknown field", {"prompt": "a", "qualty": 1}, 400, "qualty"),
        ("response_format url", {"prompt": "a", "response_format": "url"}, 400, "response_format"),
        ("body over 64 KiB", {"prompt": "a" * 70000}, 413, None),
    ]
    for name, body, st, param in bodies:
        out.append(C(f"body {name}", "bodies", FAST, _send(body, _status(st, param=param))))
    out.append(C("body chunked over 64 KiB", "bodies", FAST, _send(b"10001\r\n" + b" " * 65537 + b"\r\n0\r\n\r\n",
               _status(413), headers={"Transfer-Encoding": "chunked"}, content_length=False)))
    out.append(C("body good", "bodies", FAST, _send({"prompt": "a red circle", "seed": 3}, _image_ok()), "ok"))
    out.append(C("body emoji prompt", "bodies", FAST, _send({"prompt": "🐱 a cat", "size": "64x64"}, _image_ok()), "ok"))
    # --- auth
    key = ["--api-key", "s3cret-KEY"]
    for name, headers, st in [("no header", {}, 401), ("wrong key", {"Authorization": "Bearer nope"}, 401),
                              ("basic scheme", {"Authorization": "Basic s3cret-KEY"}, 401),
                              ("latin-1 bytes", {"Authorization": "Bearer s3cr\xe9t"}, 401)]:
        out.append(C(f"auth {name}", "auth", FAST + key, _send({"prompt": "a"}, _status(st), headers=headers)))
    out.append(C("auth right key", "auth", FAST + key, _send({"prompt": "a"}, _image_ok(),
               headers={"Authorization": "bearer  s3cret-KEY "}), "ok"))
    for name, args, env in [("LADR_RT_API_KEY empty", FAST, {"LADR_RT_API_KEY": ""}),
                            ("LADR_RT_API_KEY spaces", FAST, {"LADR_RT_API_KEY": " k "}),
                            ("--api-key empty", FAST + ["--api-key", ""], None),
                            ("--api-key non-ASCII", FAST + ["--api-key", "kéy"], None),
                            ("--api-key newline", FAST + ["--api-key", "k\ney"], None)]:
        out.append(C(f"auth {name}", "auth", args, None, env=env, stop=None))
    # --- queue
    out.append(C("queue n over --max-queue", "queue", FAST + ["--max-queue", "2"],
                 _send({"prompt": "a", "n": 3}, _status(400, param="n"))))
    out.append(C("queue full is 429", "queue", SLOW_STEP + ["--max-queue", "1"], _queue_full))
    out.append(C("queue hang-up behind the head", "queue", SLOW_STEP + ["--max-queue", "2"], _queue_not_head))
    # --- disconnects
    for when in ("upload", "queued", "running"):
        out.append(C(f"disconnect while {when}", "disconnects", SLOW_STEP, _hang_up(when)))
    out.append(C("disconnect stalled upload is 408", "disconnects", FAST + ["--read-timeout", "1"],
                 _send(b'{"prompt": "x"', _status(408, code="body_timeout"), headers={"Content-Length": "100"},
                       content_length=False)))
    out.append(C("disconnect malformed chunk size", "disconnects", FAST,
                 # the HTTP parser's own plain-text 400 (docs/server-errors.md), one warning line logged
                 _send(b"zz\r\nabc\r\n0\r\n\r\n", _status(400, shape=False), headers={"Transfer-Encoding": "chunked"},
                       content_length=False)))
    out.append(C("disconnect garbage request line", "disconnects", FAST,
                 lambda s, w: _status(400, shape=False)(s.request(b"", method="GET /x\x00y", content_length=False))))
    # --- signals (the drive leaves clients waiting; the case's signal then stops the server)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        out.append(C(f"signal {sig.name} with 4 queued over a 3 s grace", "signals",
                     SLOW_STEP + ["--max-queue", "8", "--shutdown-grace", "3"], _drain(4), stop=sig))
    out.append(C("signal SIGTERM during a long step", "signals", ["--mode", "sequential", "--height", "1024", "--width",
                 "1024", "--steps", "20", "--shutdown-grace", "1"], _long_step))
    out.append(C("signal SIGTERM with a stalled upload", "signals", FAST + ["--shutdown-grace", "3"], _stalled_upload,
                 bound=40))
    out.append(C("signal SIGTERM with stalled headers", "signals", FAST + ["--shutdown-grace", "3"], _stalled_headers,
                 bound=40))
    out.append(C("signal SIGTERM while loading", "signals", FAST, "loading"))
    out.append(C("signal SIGTERM twice", "signals", SLOW_STEP + ["--max-queue", "8", "--shutdown-grace", "3"],
                 _drain(2), stop=-signal.SIGTERM))
    # --- options: one line, before listening
    for name, args in [("--height 100", ["--height", "100"]), ("--width 0", ["--width", "0"]),
                       ("--prompt-budget 100000", ["--prompt-budget", "100000"]), ("--max-queue 0", ["--max-queue", "0"]),
                       ("--port 70000", ["--port", "70000"]), ("--batch 0", ["--batch", "0"]),
                       ("--mode sequential --batch 2", ["--mode", "sequential", "--batch", "2"]),
                       ("--shutdown-grace -1", ["--shutdown-grace", "-1"]), ("--read-timeout nan", ["--read-timeout", "nan"]),
                       ("--steps 0", ["--steps", "0"]), ("--cfg nan", ["--cfg", "nan"]),
                       ("--host bad", ["--host", "no-such-host.invalid"]),
                       ("--engine missing", ["--engine", "{work}/nope"]),
                       ("--engine height mismatch", ["--engine", "{engine}", "--height", "64"]),
                       ("--engine batch mismatch", ["--engine", "{engine}", "--batch", "3"]),
                       ("--replica-cpus without --replicas", ["--replica-cpus", "1"])]:
        out.append(C(f"option {name}", "options", args, None, stop=None,
                     model=None if "--engine" in args else "{tiny}"))
    out.append(C("option --replicas 2 --replica-cpus 8 (Ray)", "options", ["--replicas", "2", "--replica-cpus", "8"],
                 None, stop=None, bound=240))
    # --- faults: the model's files changed under a running server
    for how in ("truncate", "delete", "rewrite"):
        out.append(C(f"fault weights {how}d under a running server", "faults", FAST, _truncate(how), "ok",
                     model="{copy}"))
    return out


def run_server_case(case: ServerCase, fx: dict[str, Path], base: Path) -> dict:
    import socket as socketlib

    from serve_proc import ACCESS_LINE, ServeProc

    work = Path(tempfile.mkdtemp(prefix="scase-", dir=base))
    t0 = time.monotonic()
    res = {"name": case.name, "class": case.cls, "rc": None}

    def fill(a):
        return str(a).format(tiny=fx["tiny"], engine=fx["engine"], work=work, copy=work / "m")

    if case.model == "{copy}":
        shutil.copytree(fx["tiny"], work / "m")
    args = ([] if case.model is None else ["--model", fill(case.model)]) + [fill(a) for a in case.args]
    extra = dict(case.env or {})
    s = ServeProc(*args, extra_env=extra)
    wrong, outcome = None, None
    try:
        if case.drive is None:  # an option: refused in one line before listening
            try:
                rc = s.wait(case.bound)
            except subprocess.TimeoutExpired:
                outcome = "hang"
            else:
                res["rc"] = rc
                lines = [ln for ln in s.lines if ln.strip()]
                if "Traceback" in s.stderr:
                    outcome = "traceback"
                elif rc == 0 or any("listening on" in ln for ln in lines):
                    outcome, wrong = "silent", "started (or exited 0) instead of refusing"
                elif len(lines) != 1:
                    outcome = "multiline"
                else:
                    outcome = "clear"
        elif case.drive == "loading":
            s.until(lambda: s.port is not None, what="listening")
        else:
            s.wait_ready(case.bound)
            wrong = case.drive(s, work)
    except AssertionError as e:
        if s.p.poll() is not None and s.p.returncode < 0:
            outcome = "crash"
        else:
            outcome, wrong = "hang", str(e).splitlines()[0][:200]
    except (OSError, ConnectionError, TimeoutError) as e:
        outcome, wrong = ("crash" if s.p.poll() is not None else "hang"), f"{type(e).__name__}: {e}"
    if case.drive is not None:
        socks = getattr(s, "_socks", [])
        if s.p.poll() is not None and outcome is None:
            outcome = "crash"
        elif case.stop is not None and s.p.poll() is None:
            if case.stop < 0:  # twice
                s.p.send_signal(-case.stop)
                time.sleep(0.3)
                s.p.send_signal(-case.stop)
            else:
                s.p.send_signal(case.stop)
        answers = []
        for k in socks:  # clients left waiting: each must get 200 or 503 + Retry-After, in time
            k.settimeout(max(5.0, case.bound - (time.monotonic() - t0)))
            try:
                answers.append(answer(k))
            except (OSError, ConnectionError) as e:
                answers.append(e)
        try:
            res["rc"] = s.wait(max(5.0, case.bound - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            s.p.kill()
            s.wait(10)
            outcome = outcome or "hang"
            res["rc"] = "killed"
        if outcome is None:
            bad = [a for a in answers if isinstance(a, Exception)]
            if bad:
                outcome, wrong = "hang", f"a waiting client got no answer ({bad[0]})"
            for a in answers:
                if not isinstance(a, Exception) and a[0] != 200:
                    w = _status(503, code="shutting_down", retry=True)(a)
                    if w:
                        outcome, wrong = "silent", w
            if socks and not any(not isinstance(a, Exception) and a[0] == 503 for a in answers):
                outcome, wrong = outcome or "silent", wrong or "no waiting client was told 503"
            if isinstance(res["rc"], int) and res["rc"] < 0:
                outcome = "crash"
            elif res["rc"] not in (0,):
                outcome, wrong = "crash", wrong or f"exit {res['rc']} after a signal"
    err = s.stderr
    res["stderr"] = err[-400:]
    res["seconds"] = round(time.monotonic() - t0, 2)
    if case.drive is not None and outcome in (None, "clear") and problems(err):
        outcome = "traceback" if any("Traceback" in ln or "Exception in" in ln for ln in problems(err)) else "multiline"
    if outcome is None:
        if wrong:
            outcome = "silent"
        else:
            # the server's own lines: listening, ready, stopped; one warning per malformed request;
            # the access log's one line per request is the log doing its job, not noise
            own = ("ladr-rt serve: listening", "ladr-rt serve: ready", "ladr-rt serve: stopped by")
            extra_lines = [ln for ln in err.splitlines()
                           if ln.strip() and not ACCESS_LINE.match(ln) and not ln.startswith(own)]
            if len(extra_lines) > 1:
                outcome = "multiline"
            else:
                outcome = "ok" if case.expect == "ok" else "clear"
    if wrong:
        res["wrong"] = wrong
    if s.port is not None and outcome not in ("hang",):
        with socketlib.socket() as probe:
            # SO_REUSEADDR: the clients' closed connections (TIME_WAIT) do not count, a listener does
            probe.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", s.port))
            except OSError:
                outcome, res["left"] = "leftover", f"port {s.port} still bound"
    res["outcome"] = outcome
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every case's outcome here")
    ap.add_argument("-k", default=None, help="only cases whose name contains this (or one of A|B|...)")
    ap.add_argument("--section", choices=("all", "cli", "server"), default="all",
                    help="cli: the ladr-rt commands; server: `ladr-rt serve` processes under hostile clients")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ladr-sweep-"))
    try:
        fx = make_fixtures(base)
        results = []
        if args.section in ("all", "cli"):
            todo = [c for c in cases(fx) if args.k is None or any(k in c.name for k in args.k.split("|"))]
            with ThreadPoolExecutor(args.jobs) as ex:
                results += list(ex.map(lambda c: run_case(c, base), todo))
        if args.section in ("all", "server"):
            todo = [c for c in server_cases(fx) if args.k is None or any(k in c.name for k in args.k.split("|"))]
            with ThreadPoolExecutor(args.jobs) as ex:
                def one(c):
                    r = run_server_case(c, fx, base)
                    print(f"  {r['outcome']:9s} {r['seconds']:6.1f} s  {r['name']}", file=sys.stderr, flush=True)
                    return r

                results += list(ex.map(one, todo))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] not in ("clear", "ok"):
            print(f"{r['outcome']:9s} {r['class']:11s} {r['name']}: rc {r['rc']} {r.get('wrong', '')} "
                  f"{r.get('left', '')} {r['stderr'][-300:]!r}")
    for r in results:
        if r["outcome"] == "clear":
            print(f"clear     {r['class']:10s} {r['name']}: {(r['stderr'].splitlines() or ['(silent)'])[-1][:160]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({"cases": len(results), **counts}))
    return 0 if set(counts) <= {"clear", "ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
