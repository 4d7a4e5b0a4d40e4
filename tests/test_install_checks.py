"""What a fresh install can lack: `ladr-rt build` without the extra its backend needs (one line
naming the install, before the checkpoint is hashed, loaded or even read), and a transformers too
old for the tokenizer files (the line names the version, not the intact files)."""
from __future__ import annotations

import sys

import pytest


def _build(*args):
    from click.testing import CliRunner

    from ladr_rt.cli import main

    return CliRunner().invoke(main, ["build", *args])


@pytest.mark.parametrize("blocked,backend,install", [
    ("onnxscript", "onnx", "pip install 'ladr-rt[onnx]'"),
    ("onnxruntime", "onnx", "pip install 'ladr-rt[onnx]'"),
    ("onnx", "tensorrt", "pip install 'ladr-rt[gpu,tensorrt]'"),
])
def test_missing_extra_is_one_line_before_any_checkpoint_work(tiny_ckpt, tmp_path, monkeypatch, blocked, backend,
                                                              install):
    import ladr_rt.checkpoint as ckpt

    def touched(*a, **k):
        raise AssertionError("the checkpoint was touched before the extras were checked")

    for name in ("read_config", "checkpoint_digest", "load_model", "load_tokenizer"):
        monkeypatch.setattr(ckpt, name, touched)
    monkeypatch.setitem(sys.modules, blocked, None)  # find_spec and import both see it as absent
    if backend == "tensorrt":
        monkeypatch.setitem(sys.modules, "tensorrt", None)
    r = _build("--model", str(tiny_ckpt), "--height", "32", "--width", "32", "--backend", backend,
               "--out", str(tmp_path / "tiny"))
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert blocked in lines[0] and install in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "a failed check left files behind"


def test_no_validate_tensorrt_build_does_not_ask_for_onnxruntime():
    from ladr_rt.build import require_extras

    present = {"onnx", "onnxscript", "tensorrt"}
    require_extras("tensorrt", validate=False, find_spec=lambda m: object() if m in present else None)
    with pytest.raises(ValueError, match=r"needs onnxruntime.*ladr-rt\[gpu\]"):
        require_extras("tensorrt", validate=True, find_spec=lambda m: object() if m in present else None)


def test_old_transformers_is_named_not_the_tokenizer_files(monkeypatch, tmp_path):
    """transformers 4.x has no TokenizersBackend: simulated by its version and the error its
    AutoTokenizer raises for the shipped files (transformers 4.57.6's message)."""
    import transformers
    from click.testing import CliRunner

    from ladr_rt.cli import main

    def no_such_class(*a, **k):
        raise ValueError("Tokenizer class TokenizersBackend does not exist or is not currently imported.")

    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_such_class)
    r = CliRunner().invoke(main, ["generate", "--prompt", "a red circle", "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 1, r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "transformers 4.57.6" in line and "pip install -U 'transformers>=5'" in line, line
    assert "'TokenizersBackend'" in line and "restore" not in line, line
    assert not (tmp_path / "o.png").exists()


def test_broken_tokenizer_files_are_still_blamed_on_a_current_transformers(monkeypatch, tmp_path):
    import shutil

    from ladr_rt import shipped
    from ladr_rt.checkpoint import CheckpointError, load_tokenizer

    d = tmp_path / "m"
    shutil.copytree(shipped.model_dir(), d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no usable tokenizer files.*restore tokenizer.json"):
        load_tokenizer(d)


def test_unimportable_transformers_is_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from ladr_rt.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError, as a version clash does
    r = CliRunner().invoke(main, ["generate", "--prompt", "a red circle", "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "transformers cannot be imported" in r.output and "pip install -U 'transformers>=5'" in r.output
