"""The exporter lets go of the model: onnxscript's optimizer keeps its rewrite rules' last
match at module level, and that graph wraps the exported module's own parameters."""
from __future__ import annotations

import gc
import weakref

from ladr_rt.build import export_onnx
from ladr_rt.config import ImageSpec
from ladr_rt.engines.graph import EngineGraph
from ladr_rt.tiny import tiny_config
from ladr_rt.tokens import SequenceLayout


def test_export_frees_the_model(tmp_path):
    """Later exports in one process (tests/test_engines.py builds several) show that clearing the
    matchers' state between exports changes nothing they produce."""
    cfg = tiny_config()
    seq = SequenceLayout(ImageSpec(32, 32, 16), cfg.layout)
    graph = EngineGraph.random(cfg, seq.seq_len, seq.image_positions)
    refs = [weakref.ref(p) for p in graph.parameters()]
    export_onnx(graph, tmp_path / "a.onnx", 2, seq.seq_len)
    del graph
    gc.collect()
    alive = sum(r() is not None for r in refs)
    assert alive == 0, f"{alive} of {len(refs)} parameters outlived the export"
