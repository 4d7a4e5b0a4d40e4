"""The runtime package and the testbed tooling import one way: ladr_testbed -> ladr_rt, never back."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "ladr_rt"


def _imports(source: str, pkg: tuple[str, ...]) -> set[str]:
    """Absolute names of every module a source imports; relative imports resolved against ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def test_runtime_never_imports_the_testbed_tooling():
    offenders = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        pkg = path.relative_to(ROOT).parts[:-1]
        bad = {m for m in _imports(path.read_text(), pkg) if m == "ladr_testbed" or m.startswith("ladr_testbed.")
               or m.startswith("ladr_rt.testbed")}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"runtime modules import the testbed tooling: {offenders}"
    assert not (RUNTIME / "testbed").exists(), "ladr_rt/testbed is back; the tooling lives in ladr_testbed/"


def test_import_scan_sees_relative_and_absolute_imports():
    """The scan above would pass vacuously if it missed an import form; it must see all of them."""
    src = ("import ladr_testbed\nfrom ladr_testbed.scenes import GRID\nfrom .testbed import model_dir\n"
           "def f():\n    from ..testbed import scenes\n")
    got = _imports(src, ("ladr_rt", "serve"))
    assert "ladr_rt.testbed.scenes" in got and {"ladr_testbed", "ladr_testbed.scenes", "ladr_rt.testbed"} <= got


def test_generating_with_the_shipped_model_loads_no_testbed_module():
    """What a deployment runs (the CLI, the default model's path) works without the tooling loaded."""
    code = ("import sys\nfrom ladr_rt import cli, pipeline, shipped\n"
            "assert (shipped.model_dir() / 'config.json').is_file()\n"
            "assert (shipped.model_dir('v3') / 'config.json').is_file()\n"
            "print(sorted(m for m in sys.modules if m.startswith('ladr_testbed')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
