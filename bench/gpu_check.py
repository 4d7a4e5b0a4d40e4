"""The one-command GPU check: what a GPU session runs, as is, in one device call.

    bench/device/fetch_wheels.sh                                   # here, once: the wheels the device lacks -> .whl/
    bash bench/device/run_check.sh                                 # on the GPU machine (carry .whl): installs
                                                                   # .whl/ if present, then runs this with --out $OUT
    python bench/gpu_check.py --smoke --out /tmp/gpu_check         # every stage on the CPU, tiny, ~10 s
                                                                    # (+ one inductor compile, 15-60 s)

Stages, each written to --out as soon as it finishes (a run killed at its limit still returns
what it measured), each in a child process with its own timeout (a hung CUDA call cannot
overrun the global deadline):

1. (<= 120 s) ``pytest -m gpu tests`` (``stage1_argv``): no host sync in a step (sync-debug
   mode "error"), the cached whole-step CUDA graph == eager steps bit for bit across seeds,
   torch-graph == eager, a real capture failure falling back cleanly, TensorRT/onnxruntime-CUDA
   parity where present. Test modules whose optional extra is missing (ray, fastapi, uvicorn;
   diffusers for the tiny checkpoints) skip with the reason instead of stopping collection.
   -> stage1.json (every test's outcome and message; the summary counts the skip reasons)
2. (<= 300 s) the full-size latency table (``bench/latency.py --gpu``): the 8B DiMOO config
   with random bf16 weights built on the device, 512^2 and 1024^2, cfg 4, one prompt; rows
   official-style, eager, torch-graph (whole step replayed), TensorRT if it imports, inductor
   (an AOTInductor package: at 8B one block compiled and timed against the eager block, the
   full-model figure scaled from the eager row and stated as such, in ``scaled_rows``); per row
   median ms per evaluation (CUDA events), sampler-step ms, peak memory (reset per row) and
   whether an image of that size fits 24 / 48 / 80 GB cards, TFLOP/s and the fraction of a bf16
   8192^3 matmul peak measured in the same run. Measured speed-ups compare the same work: per
   evaluation, per whole step, and per image at equal steps (64-step baseline rule). LADR's
   evaluation count on random weights says nothing about DiMOO's, so the LADR speed-up is a
   cost model at a stated count, labelled as such. -> stage2.json
3. (<= 60 s) the tiny engine graph through ``ladr_rt.build.export_onnx``: its ops (no IsNaN
   guard), onnxruntime parity with eager; if TensorRT imports, a plan built from it
   (``engines.trt.build_plan``), parity, and CUDA-graph replay == plain execution. -> stage3.json

A global deadline (default 405 s: with the kill grace and the wheel install the call stays
<= 7 min, so one rerun fits in 15 minutes of device time, start-ups included) stops starting stages and rows past it and says what it skipped. Ends with one JSON
line (also summary.json); the log is gpu_check.log. Python packages the check needs beyond the
device image are named in the summary (``missing_wheels``); bench/device/fetch_wheels.sh fetches
them (see bench/RESULTS.md "GPU check").
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bare copy of the working tree: no pip install needed

# The whole device call stays <= 7 min (420 s), so a rerun fits in 15 min of device time with
# the machine's start-ups: the deadline, plus a child's kill grace (CHILD_GRACE_S) past it, plus
# run_check.sh's wheel install (a few seconds). STAGE_S caps each stage; the deadline governs.
DEADLINE_S = 405.0
CHILD_GRACE_S = 10.0
STAGE_S = {1: 120.0, 2: 300.0, 3: 60.0}  # stage 1 holds one tiny CUDA inductor compile
SMOKE_DEADLINE_S = 180.0  # the smoke's inductor row compiles a package on the CPU: 15-60 s on 2 busy cores
STAGE3_RESERVE_S = 40.0  # kept back from stage 2 so stage 3 still runs
# Packages absent from the device image that some stage needs, with why: pure-Python wheels
# (charset_normalizer has a compiled cp312 one and a pure fallback), ~6.9 MB together. The
# versions are the ones checked in a CPU copy of the device image (bench/RESULTS.md).
# bench/device/fetch_wheels.sh downloads exactly these (``--wheel-specs``).
_VQ = ("stage 1: the tests' tiny checkpoints carry a diffusers VQModel (tests/conftest.py tiny_ckpt); "
       "stages 2 and 3 need no VQ decoder")
WHEELS = {
    "diffusers": ("0.42.1", _VQ),
    "requests": ("2.34.2", "diffusers imports it (absent from the device image)"),
    "urllib3": ("2.8.0", "requests needs it"),
    "charset_normalizer": ("3.5.3", "requests needs it"),
    "importlib_metadata": ("10.2.0", "a declared requirement of diffusers"),
    "zipp": ("4.1.2", "importlib_metadata needs it"),
}
FETCH_WHEELS = "bench/device/fetch_wheels.sh"
RUN_CHECK = "bench/device/run_check.sh"


def wheel_specs() -> list[str]:
    return [f"{n}=={v}" for n, (v, _) in WHEELS.items()]


class Check:
    def __init__(self, out: Path, smoke: bool, deadline_s: float, log_name: str | None = "gpu_check.log",
                 tag: str = "gpu-check"):
        self.out, self.smoke, self.deadline_s, self.tag = out, smoke, deadline_s, tag
        out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.log_path = out / log_name if log_name else None
        self._lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.deadline_s - self.elapsed()

    def write(self, text: str) -> None:
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write(text)

    def log(self, msg: str) -> None:
        self.write(f"[{self.tag} {self.elapsed():6.1f}s] {msg}\n")

    def save(self, name: str, obj) -> Path:
        p = self.out / name
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
        os.replace(tmp, p)
        return p

    def child(self, cmd: list[str], timeout: float, grace: float = CHILD_GRACE_S) -> tuple[int, bool]:
        """Run ``cmd`` from the repository root, its output teed into the log. At ``timeout`` its
        process group gets SIGINT (pytest still writes its report, the latency suite has saved
        its rows), and SIGKILL ``grace`` seconds later. Returns (exit code, timed out)."""
        self.log("$ " + " ".join(cmd) + f"  (timeout {timeout:.0f} s)")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, start_new_session=True)
        pump = threading.Thread(target=lambda: [self.write(line) for line in p.stdout], daemon=True)
        pump.start()
        timed_out = False
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.log(f"interrupting the child at its {timeout:.0f} s timeout")
            os.killpg(p.pid, signal.SIGINT)  # our own child's process group only
            try:
                rc = p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
                self.log("killed the child")
        pump.join(timeout=5)
        return rc, timed_out


# ------------------------------------------------------------------ stage 1: the CUDA tests


def junit_results(xml_path: Path) -> dict:
    tests, outcomes = [], collections.Counter()
    root = ET.parse(xml_path).getroot()
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = el.get("message") or el.text or ""
                if message == "collection skipped" and el.text:  # a module that skipped: the text has why
                    message = _collection_skip_reason(el.text)
                message = message[:500]
                break
        outcomes[outcome] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return {"collected": len(tests), "outcomes": dict(outcomes), "tests": tests}


def _collection_skip_reason(text: str) -> str:
    """junit's text of a module skipped at collection, "('path', line, 'Skipped: why')" -> why."""
    import ast

    try:
        parts = ast.literal_eval(text.strip())
        why = str(parts[-1]) if isinstance(parts, tuple) and parts else text
    except (ValueError, SyntaxError):
        why = text
    return why.removeprefix("Skipped: ")


def _ort_cuda() -> bool:
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def stage1_paths(smoke: bool) -> list[str]:
    # The smoke run collects only this check's own gpu tests: collecting the whole suite costs
    # the CI more than the rest of the smoke run (the device collects all of them;
    # tests/test_gpu_check_collect.py runs that collection on the CPU with the extras hidden).
    return ["tests/test_gpu_ready.py"] if smoke else ["tests"]


def stage1_deselect(smoke: bool) -> list[str]:
    if not smoke and not _ort_cuda():
        # It would build the tiny onnx engine (its fixture) only to skip for want of the CUDA EP.
        return ["tests/test_engines.py::test_onnxruntime_cuda_parity"]
    return []


def stage1_argv(smoke: bool, junit: Path, deselect: list[str] | None = None) -> list[str]:
    """The exact pytest command of stage 1 (run from the repository root)."""
    deselect = stage1_deselect(smoke) if deselect is None else deselect
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
            *[f"--deselect={d}" for d in deselect], *stage1_paths(smoke)]


def skip_reasons(tests: list[dict]) -> dict[str, int]:
    """{skip message: count}: on the device these say which tests did not run and why."""
    return dict(collections.Counter(t["message"][:200] for t in tests if t["outcome"] == "skipped").most_common())


def stage1(c: Check, timeout: float) -> dict:
    deselect = stage1_deselect(c.smoke)
    for d in deselect:
        c.log(f"stage 1: onnxruntime has no CUDAExecutionProvider here: deselecting {d}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        xml = Path(tmp) / "junit.xml"
        rc, timed_out = c.child(stage1_argv(c.smoke, xml, deselect), timeout)
        res = junit_results(xml) if xml.is_file() else {"collected": 0, "outcomes": {}, "tests": []}
    res.update(rc=rc, timed_out=timed_out, paths=stage1_paths(c.smoke), deselected=deselect,
               skip_reasons=skip_reasons(res["tests"]))
    bad = res["outcomes"].get("failed", 0) + res["outcomes"].get("error", 0)
    ran = res["outcomes"].get("passed", 0) + bad
    # pytest exits 5 when every test was deselected; here that means no gpu test exists: a failure.
    # On the device, a stage where every gpu test skipped measured nothing: a failure too.
    res["status"] = ("timeout" if timed_out else
                     "ok" if rc == 0 and not bad and res["collected"] and (ran or c.smoke) else "failed")
    for reason, n in res["skip_reasons"].items():
        c.log(f"stage 1: {n} skipped: {reason}")
    return res


# ------------------------------------------------------------------ stage 2: the latency table


def _latency():
    spec = importlib.util.spec_from_file_location("bench_latency", ROOT / "bench" / "latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# onnxruntime: the device image's is CPU-only. The fp8 rows (eager-fp8, torch-graph-fp8) run beside
# the bf16 ones at each resolution; their speed-up over bf16 is stage2.json's fp8_vs_bf16.
STAGE2_BACKENDS = "official,eager,torch-graph,eager-fp8,torch-graph-fp8,inductor,tensorrt"


def stage2(c: Check, timeout: float) -> dict:
    out = c.out / "stage2.json"
    if c.smoke:  # in-process: the same suite on the CPU, 1-layer model, fp32 (CPU bf16 is slow)
        import torch

        lat = _latency()
        res = lat.run_gpu_suite("micro", resolutions=[(32, 48)], backends=tuple(STAGE2_BACKENDS.split(",")),
                                device="cpu", dtype=torch.float32, prompt_budget=32, warmup=1, reps=2, e2e_steps=4,
                                ladr_evals=2, budget_s=0.8 * timeout, deadline_s=0.7 * timeout, out=out, log=c.log)
        timed_out, rc = False, 0
    else:
        # A 1024^2 row takes ~45 s (estimated): no row starts that could not finish inside the
        # timeout, and no measured end-to-end run starts in the last 100 s.
        deadline, budget = max(5.0, timeout - 75.0), max(3.0, timeout - 100.0)
        rc, timed_out = c.child([sys.executable, str(ROOT / "bench" / "latency.py"), "--gpu", "--gpu-model", "8b",
                                 "--resolutions", "512,1024", "--gpu-backends", STAGE2_BACKENDS,
                                 "--deadline-s", f"{deadline:.0f}", "--budget-s", f"{budget:.0f}",
                                 "--gpu-out", str(out)], timeout)
        res = json.loads(out.read_text()) if out.is_file() else {}
    failed = [s for s in res.get("skipped", []) if str(s.get("reason", "")).startswith("failed")]
    status = "timeout" if timed_out else ("ok" if rc == 0 and res.get("rows") and not failed else "failed")
    lat = _latency()
    return {"status": status, "rc": rc, "timed_out": timed_out, "rows": len(res.get("rows", [])),
            "memory": [{"row": f"{r['resolution']}/{r['backend']}",
                        "peak_gib": None if r.get("peak_memory_bytes") is None else round(r["peak_memory_bytes"] / 2**30, 2),
                        "fits_cards": r.get("fits_cards"), **{k: r[k] for k in lat.ROW_EXTRA_KEYS if k in r}}
                       for r in res.get("rows", [])],
            "skipped": [{k: v for k, v in s.items() if k != "traceback"} for s in res.get("skipped", [])],
            "speedup_vs_official": res.get("speedup_vs_official", {}),
            "scaled_rows": [{k: r.get(k) for k in ("resolution", "backend", "method", "block_speedup",
                                                   "eval_s_estimate", "eager_eval_s")}
                            for r in res.get("scaled_rows", [])],
            "fp8_vs_bf16": res.get("fp8_vs_bf16", {})}


# ------------------------------------------------------------------ stage 3: export, TensorRT


def stage3_body(device: str, workdir: Path, log) -> dict:
    """The tiny engine graph exported as ``ladr-rt build`` exports it; its ops and onnxruntime
    parity with the eager model on inputs whose rows both have padding (so the key bias
    counts); then, if TensorRT imports, a plan, its parity, and CUDA-graph replay."""
    import onnx
    import torch

    from ladr_rt.build import TOLERANCES, check_onnx_file, compare, export_onnx, ort_runner
    from ladr_rt.config import ImageSpec
    from ladr_rt.engines.graph import EngineGraph
    from ladr_rt.model import DimooModel
    from ladr_rt.tiny import tiny_config
    from ladr_rt.tokens import SequenceLayout

    dev = torch.device(device)
    torch.manual_seed(0)
    model = DimooModel(tiny_config(n_layers=1, weight_tying=True)).to(dev).eval().requires_grad_(False)
    seq = SequenceLayout(ImageSpec(16, 32, 8), model.cfg.layout)  # 1 x 2 codes, L = 8 + 2 + 3 + 2 = 15
    L, N, K = seq.seq_len, seq.n_image, model.cfg.layout.codebook
    graph = EngineGraph.from_model(model, L, seq.image_positions)
    path = workdir / "tiny.onnx"
    t0 = time.perf_counter()
    export_onnx(graph, path, 2, L)
    check_onnx_file(path)
    export_s = time.perf_counter() - t0
    proto = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    ops.update(n.op_type for f in proto.functions for n in f.node)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, L), generator=g, dtype=torch.int32)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[0, :2] = False  # left padding in both rows, of different lengths
    mask[1, :5] = False
    with torch.inference_mode():
        ref = model(ids.long().to(dev), mask.to(dev), image_positions=seq.image_positions.to(dev)).float().cpu()
    parity = compare(ort_runner(path, torch.device("cpu"))(ids, mask), ref.numpy())
    res: dict = {"onnx": {"export_s": export_s, "ops": dict(sorted(ops.items())), "isnan_nodes": ops.get("IsNaN", 0),
                          "parity": parity, "tolerance_fp32_rel": TOLERANCES["fp32"].rel_err, "padded_rows": 2,
                          "seq_len": L}}
    log(f"stage 3: exported in {export_s:.1f} s; IsNaN nodes {ops.get('IsNaN', 0)}, Softmax {ops.get('Softmax', 0)}; "
        f"onnxruntime vs eager rel err {parity['rel_err']:.2e}, top-1 {parity['top1']:.3f}")
    ok = ops.get("IsNaN", 0) == 0 and parity["rel_err"] <= TOLERANCES["fp32"].rel_err and parity["top1"] == 1.0
    try:
        from ladr_rt.engines.trt import import_trt

        trt = import_trt()
    except Exception as e:  # EngineError (not installed / placeholder) or a broken install
        res["tensorrt"] = f"skipped: TensorRT does not import here ({str(e)[:200]})"
        log(f"stage 3: {res['tensorrt']}")
        res["ok"] = ok
        return res
    if dev.type != "cuda":
        res["tensorrt"] = "skipped: TensorRT imports, but this stage runs on the CPU"
        res["ok"] = ok
        return res
    from ladr_rt.engines.trt import TrtDenoiser, build_plan, plan_runner

    plan = workdir / "tiny.plan"
    t0 = time.perf_counter()
    build_plan(path, plan, "fp32")
    build_s = time.perf_counter() - t0
    trt_parity = compare(plan_runner(plan, 2, L, N, K, dev)(ids, mask), ref.numpy())
    d_ids, d_mask = ids.to(dev), mask.to(dev)
    plain, replay = (torch.empty(2, N, K, device=dev) for _ in range(2))
    TrtDenoiser(plan, dev, cuda_graph=False)(d_ids, d_mask, plain)
    den = TrtDenoiser(plan, dev, cuda_graph=True)
    for _ in range(3):
        den(d_ids, d_mask, replay)
    torch.cuda.synchronize(dev)
    replay_equal = bool(den.graph is not None and torch.equal(plain, replay))
    res["tensorrt"] = {"version": trt.__version__, "build_s": build_s, "parity": trt_parity,
                       "graph_replay_equals_plain": replay_equal}
    log(f"stage 3: TensorRT {trt.__version__} plan in {build_s:.1f} s; rel err {trt_parity['rel_err']:.2e}; "
        f"graph replay == plain: {replay_equal}")
    res["ok"] = ok and replay_equal and trt_parity["rel_err"] <= TOLERANCES["fp32"].rel_err
    return res


def stage3(c: Check, timeout: float, device: str) -> dict:
    out = c.out / "stage3.json"
    if c.smoke:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            res = stage3_body(device, Path(tmp), c.log)
        c.save("stage3.json", res)
        rc, timed_out = 0, False
    else:
        rc, timed_out = c.child([sys.executable, str(Path(__file__).resolve()), "--only-stage", "3", "--device", device,
                                 "--out", str(c.out)], timeout)
        res = json.loads(out.read_text()) if out.is_file() else {}
    status = "timeout" if timed_out else ("ok" if rc == 0 and res.get("ok") else "failed")
    return {"status": status, "rc": rc, "timed_out": timed_out,
            "isnan_nodes": res.get("onnx", {}).get("isnan_nodes"),
            "onnx_rel_err": res.get("onnx", {}).get("parity", {}).get("rel_err"),
            "tensorrt": res.get("tensorrt") if isinstance(res.get("tensorrt"), str) else "ran"}


# ------------------------------------------------------------------ the check


def missing_wheels() -> list[dict]:
    return [{"name": n, "version": v, "needed_by": why,
             "how": f"{FETCH_WHEELS} (here, fetches .whl/), then carry .whl: {RUN_CHECK} installs it there"}
            for n, (v, why) in WHEELS.items() if importlib.util.find_spec(n) is None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu_check",
                    help="directory for the stage JSONs, the log and the summary (default: $OUT)")
    ap.add_argument("--smoke", action="store_true", help="every stage on the CPU at tiny size (CI: ~10 s)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help=f"global deadline (default {DEADLINE_S:.0f} s; {SMOKE_DEADLINE_S:.0f} s with --smoke)")
    ap.add_argument("--stages", default="1,2,3", help="comma-separated subset of 1,2,3")
    ap.add_argument("--device", default=None, help="device of stage 3 (default: cuda, cpu with --smoke)")
    ap.add_argument("--only-stage", type=int, default=None, help=argparse.SUPPRESS)  # a stage's child process
    ap.add_argument("--wheel-specs", action="store_true",
                    help=f"print the pinned wheels the device lacks (name==version per line; {FETCH_WHEELS}) and exit")
    a = ap.parse_args(argv)
    if a.wheel_specs:
        print("\n".join(wheel_specs()))
        return 0
    out = Path(a.out)
    device = a.device or ("cpu" if a.smoke else "cuda")
    if a.only_stage == 3:
        # the parent tees this child's output into the log; the tag tells its clock from the parent's
        c = Check(out, a.smoke, DEADLINE_S, log_name=None, tag="stage-3 child")
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            res = stage3_body(device, Path(tmp), c.log)
        c.save("stage3.json", res)
        return 0 if res.get("ok") else 1

    deadline = a.deadline_s if a.deadline_s is not None else (SMOKE_DEADLINE_S if a.smoke else DEADLINE_S)
    import torch

    threads = torch.get_num_threads()
    if a.smoke:  # tiny ops: a second intra-op thread only waits, and on a busy 2-core machine ~1000x slower
        torch.set_num_threads(1)
    try:
        return run_check(a, out, device, deadline)
    finally:
        torch.set_num_threads(threads)


def run_check(a, out: Path, device: str, deadline: float) -> int:
    import torch

    c = Check(out, a.smoke, deadline)
    if c.log_path.exists():
        c.log_path.unlink()

    cuda = torch.cuda.is_available()
    info = {"bench": "gpu-check", "smoke": a.smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__, "cuda": cuda,
            "device_name": torch.cuda.get_device_name() if cuda else None, "python": sys.version.split()[0],
            "deadline_s": deadline, "out": str(out), "missing_wheels": missing_wheels()}
    c.log(f"torch {torch.__version__}, CUDA {'yes: ' + info['device_name'] if cuda else 'no'}; "
          f"deadline {deadline:.0f} s; out {out}")
    for w in info["missing_wheels"]:
        c.log(f"MISSING {w['name']} ({w['needed_by']}); fetch: {w['how']}")
    if not a.smoke and not cuda:
        c.log("no CUDA device: this check is for a GPU machine (for a CPU run of the same code: --smoke)")
    stages, wanted = [], {int(x) for x in a.stages.split(",")}
    for n in (1, 2, 3):
        if n not in wanted:
            continue
        reserve = (STAGE3_RESERVE_S if not a.smoke else 15.0) if n == 2 and 3 in wanted else 0.0
        left = c.remaining() - reserve
        timeout = min(STAGE_S[n], left)
        if timeout < (5.0 if a.smoke else 20.0):
            stages.append({"stage": n, "status": "skipped", "reason": f"not started: {c.remaining():.0f} s left of the "
                                                                      f"{deadline:.0f} s deadline"})
            c.log(f"stage {n}: not started (past the deadline)")
            c.save("summary.json", {**info, "stages": stages, "total_s": c.elapsed()})
            continue
        c.log(f"stage {n}: start (timeout {timeout:.0f} s)")
        t0 = time.perf_counter()
        try:
            if n == 1:
                r = stage1(c, timeout)
                c.save("stage1.json", r)
                r = {"status": r["status"], "rc": r["rc"], "collected": r["collected"], "outcomes": r["outcomes"],
                     "failed": [t["test"] for t in r["tests"] if t["outcome"] in ("failed", "error")],
                     "skip_reasons": r["skip_reasons"]}
            elif n == 2:
                r = stage2(c, timeout)
            else:
                r = stage3(c, timeout, device)
        except Exception as e:  # a stage that broke must not cost the stages after it
            import traceback

            c.write(traceback.format_exc())
            r = {"status": "failed", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        r = {"stage": n, **r, "seconds": round(time.perf_counter() - t0, 1)}
        stages.append(r)
        c.log(f"stage {n}: {r['status']} in {r['seconds']} s")
        c.save("summary.json", {**info, "stages": stages, "total_s": c.elapsed()})
    summary = {**info, "stages": stages, "total_s": round(c.elapsed(), 1)}
    c.save("summary.json", summary)
    line = {k: summary[k] for k in ("bench", "smoke", "device_name", "torch", "total_s", "out")}
    line["stages"] = stages
    line["missing_wheels"] = [w["name"] for w in info["missing_wheels"]]
    c.write(json.dumps(line, default=str) + "\n")
    return 0 if all(s["status"] in ("ok", "skipped") for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
