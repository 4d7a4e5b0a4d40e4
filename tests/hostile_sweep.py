"""The hostile-user sweep: every class of bad input issue 12 found, as real `ladr-rt` processes.

    python tests/hostile_sweep.py [--jobs 2] [--json sweep.json]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write every case's outcome here")
    ap.add_argument("-k", default=None, help="only cases whose name contains this")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ladr-sweep-"))
    try:
        fx = make_fixtures(base)
        todo = [c for c in cases(fx) if args.k is None or args.k in c.name]
        with ThreadPoolExecutor(args.jobs) as ex:
            results = list(ex.map(lambda c: run_case(c, base), todo))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        if r["outcome"] not in ("clear", "ok"):
            print(f"{r['outcome']:9s} {r['class']:10s} {r['name']}: rc {r['rc']} {r.get('wrong', '')} "
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
