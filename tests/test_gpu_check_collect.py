"""The GPU machine's image has no ray, fastapi, uvicorn or diffusers. Stage 1 of the GPU check
(``bench/gpu_check.py``) runs ``pytest -m gpu tests`` there: one module importing a missing
extra at collection used to stop the whole run ("1 error during collection", no GPU test ran).
Here that exact command runs with those packages hidden (a ``sitecustomize`` meta-path finder
in the child) and must collect every gpu test and exit 0; under ``CI=true`` a missing ray must
still fail. Plus the device script that runs the check (``bench/device/run_check.sh``)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

import conftest

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("ray", "fastapi", "uvicorn", "diffusers")  # what the device image lacks


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hiding_env(tmp_path: Path, hidden=HIDDEN, ci: str | None = None) -> dict:
    """The environment of a child interpreter in which ``hidden`` do not import."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(textwrap.dedent(f"""\
        import sys

        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {tuple(hidden)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
                return None

        sys.meta_path.insert(0, _Hide())
        """))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(ROOT)])
    if ci is not None:
        env["CI"] = ci
    return env


def test_hiding_shim_works(tmp_path):
    code = "import importlib\nfor n in ('ray', 'fastapi', 'uvicorn', 'diffusers'):\n" \
           "    try:\n        importlib.import_module(n)\n    except ImportError:\n        print('hidden', n)\n"
    r = subprocess.run([sys.executable, "-c", code], env=hiding_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hidden", "ray", "hidden", "fastapi", "hidden", "uvicorn", "hidden", "diffusers"]


def test_stage1_command_collects_the_gpu_tests_without_the_extras(gpu_check, tmp_path):
    """Stage 1's own argv (``stage1_argv``, as the device runs it: the whole tests/ folder).
    On this CPU every gpu test skips for want of CUDA; what matters is that they are collected
    and run, the modules that need a hidden extra skip with their reason, and the exit is 0."""
    junit = tmp_path / "junit.xml"
    argv = gpu_check.stage1_argv(smoke=False, junit=junit)
    assert argv[1:5] == ["-m", "pytest", "-m", "gpu"] and argv[-1] == "tests"
    r = subprocess.run(argv, cwd=ROOT, env=hiding_env(tmp_path), capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "error during collection" not in out and "hidden by the test" in out  # the extras really were missing
    res = gpu_check.junit_results(junit)
    names = {t["test"].rsplit("::", 1)[-1].split("[")[0] for t in res["tests"]}
    # the gpu tests of every module that has them, including those needing a tiny checkpoint
    assert {"test_plain_step_makes_no_host_sync", "test_torch_graph_replay_equals_eager_exactly",
            "test_whole_step_graph_replay_equals_eager_steps",
            "test_cuda_step_has_no_sync_and_graph_replay_equals_eager"} <= names, names
    assert res["collected"] >= 10
    assert res["outcomes"] == {"skipped": res["collected"]}  # no CUDA here
    # -rA lists the module-level skips with their reason, and so does the stage's summary
    assert "ray is not installed" in out and "fastapi is not installed" in out
    reasons = gpu_check.skip_reasons(res["tests"])
    assert any(r.startswith("ray is not installed") for r in reasons), reasons
    assert any(r.startswith("fastapi is not installed") for r in reasons), reasons


def test_ci_fails_when_ray_is_missing(tmp_path):
    """CI installs the dev extra: there a missing ray is a collection error, not a skip."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
            "tests/test_serve_ray.py"]
    r = subprocess.run(argv, cwd=ROOT, env=hiding_env(tmp_path, ("ray",), ci="true"), capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "No module named 'ray'" in out and "error" in out.lower(), out[-2000:]


@pytest.mark.parametrize("ci", [None, "true"])
def test_tiny_checkpoint_without_diffusers_skips_or_fails_in_ci(monkeypatch, ci):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
        with pytest.raises(ImportError):
            conftest._needs_diffusers()
    else:
        with pytest.raises(pytest.skip.Exception, match="diffusers does not import here.*fetch_wheels.sh"):
            conftest._needs_diffusers()


# ------------------------------------------------------------------ the device scripts


def _stub_python(tmp_path: Path, record: Path) -> Path:
    """A PYTHON that records the check's command line and environment instead of running it
    (exit 7), and is the real interpreter for everything else (pip, zipfile)."""
    stub = tmp_path / "python-stub"
    stub.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "bench/gpu_check.py" ]; then
            {{ printf 'ARG %s\\n' "$@"; echo "PYTHONPATH=$PYTHONPATH"; echo "UNBUFFERED=$PYTHONUNBUFFERED"; }} > {record}
            exit 7
        fi
        exec {sys.executable} "$@"
        """))
    stub.chmod(0o755)
    return stub


def _tree(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "bench" / "device").mkdir(parents=True)
    for name in ("run_check.sh", "fetch_wheels.sh"):
        shutil.copy(ROOT / "bench" / "device" / name, repo / "bench" / "device" / name)
    shutil.copy(ROOT / "bench" / "gpu_check.py", repo / "bench" / "gpu_check.py")
    return repo


def _wheel(path: Path, name: str = "ladr_probe") -> Path:
    whl = path / f"{name}-1.0-py3-none-any.whl"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{name}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{name}-1.0.dist-info/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{name}-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return whl


def _run_check(repo: Path, tmp_path: Path, *args: str, out: str | None = "/tmp/device-out"):
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env.update(PYTHON=str(_stub_python(tmp_path, record)), LADR_WHEEL_SITE=str(tmp_path / "site"))
    if out:
        env["OUT"] = out
    r = subprocess.run(["bash", str(repo / "bench" / "device" / "run_check.sh"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = record.read_text().splitlines() if record.is_file() else []
    return r, [ln[4:] for ln in lines if ln.startswith("ARG ")], dict(ln.split("=", 1) for ln in lines if "=" in ln
                                                                       and not ln.startswith("ARG "))


def test_run_check_without_wheels_still_runs_the_check(tmp_path):
    repo = _tree(tmp_path)
    r, args, env = _run_check(repo, tmp_path, "--smoke", "--stages", "1")
    assert r.returncode == 7, r.stdout + r.stderr  # the check's own exit status
    assert args == ["bench/gpu_check.py", "--out", "/tmp/device-out", "--smoke", "--stages", "1"]
    assert env["UNBUFFERED"] == "1" and "no .whl/ here" in r.stdout
    r, args, _ = _run_check(repo, tmp_path, out=None)  # no OUT: gpu_check's own default
    assert r.returncode == 7 and args == ["bench/gpu_check.py"]


def test_run_check_installs_carried_wheels_and_survives_a_broken_one(tmp_path):
    repo = _tree(tmp_path)
    (repo / ".whl").mkdir()
    _wheel(repo / ".whl")
    r, args, env = _run_check(repo, tmp_path, "--stages", "2")
    assert r.returncode == 7, r.stdout + r.stderr
    assert args == ["bench/gpu_check.py", "--out", "/tmp/device-out", "--stages", "2"]
    site = tmp_path / "site"
    assert env["PYTHONPATH"].split(":")[0] == str(site)
    assert (site / "ladr_probe" / "__init__.py").read_text() == "VALUE = 42\n"
    # a damaged wheel: reported, and the check still runs
    (repo / ".whl" / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    r, args, _ = _run_check(repo, tmp_path)
    assert r.returncode == 7 and args[:3] == ["bench/gpu_check.py", "--out", "/tmp/device-out"]
    assert "could not unpack" in r.stdout, r.stdout


def test_fetch_wheels_downloads_the_pinned_list_for_the_device(tmp_path, gpu_check):
    repo = _tree(tmp_path)
    record = tmp_path / "pip.txt"
    stub = tmp_path / "python-stub"
    stub.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then printf "%s\\n" "$@" > {record}; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub))
    r = subprocess.run(["bash", str(repo / "bench" / "device" / "fetch_wheels.sh")], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pip = record.read_text().splitlines()
    assert pip[:3] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "manylinux_2_28_x86_64", "3.12", "cp"} <= set(pip)
    assert pip[-len(gpu_check.WHEELS):] == gpu_check.wheel_specs()
    assert "diffusers==0.42.1" in pip and "requests==2.34.2" in pip  # diffusers imports requests
    assert (repo / ".whl").is_dir()
