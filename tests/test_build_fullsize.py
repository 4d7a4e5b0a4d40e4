"""Export at the full model's dimensions (d_model 4096, 32 heads, MLP 12288, vocab 134548)
with 2 layers: the external-data path an 8B export takes, at a size CI can afford.

fp32 weights: wte 2.2 GB + 2 blocks 1.7 GB + codebook head 0.13 GB = 4.08 GB of external
data, past protobuf's 2 GiB limit, so the path-based checks are the only ones that work.
Measured on 2 shared CPU cores (2026-11-23): 41 s for the whole test (10 s random init,
19 s export), peak RSS 6.5 GB including the onnxruntime run.
"""
from __future__ import annotations

import gc

import pytest
import torch

from ladr_rt.config import ImageSpec, ModelConfig
from ladr_rt.tokens import SequenceLayout


@pytest.mark.slow
def test_full_dimension_two_layer_export_external_data(tmp_path):
    import onnx

    from ladr_rt.build import check_onnx_file, compare, export_onnx
    from ladr_rt.engines.graph import EngineGraph
    from ladr_rt.engines.ort import OrtDenoiser

    cfg = ModelConfig(n_layers=2)  # every other size is DiMOO's
    assert (cfg.d_model, cfg.n_heads, cfg.mlp_hidden_size, cfg.vocab_size) == (4096, 32, 12288, 134548)
    seq = SequenceLayout(ImageSpec(64, 64, 16), cfg.layout)  # 4 x 4 codes, L = 40: the size under test is the weights
    graph = EngineGraph.random(cfg, seq.seq_len, seq.image_positions, dtype=torch.float32, seed=0)
    path = tmp_path / "full2.onnx"
    export_onnx(graph, path, 2, seq.seq_len)
    data = tmp_path / "full2.onnx.data"
    assert path.stat().st_size < 10 << 20, "weights leaked into the protobuf"
    assert data.stat().st_size > 2**31, "expected to exercise the > 2 GiB external-data path"
    check_onnx_file(path)  # onnx.checker.check_model(path) + onnx.load(load_external_data=False) + I/O names
    proto = onnx.load(str(path), load_external_data=False)
    ext = [i for i in proto.graph.initializer if i.external_data]
    assert sum(int({e.key: e.value for e in i.external_data}["length"]) for i in ext) == data.stat().st_size
    vocab_rows = [list(i.dims) for i in ext if cfg.vocab_size in i.dims]
    assert vocab_rows == [[cfg.vocab_size, cfg.d_model]], "only the embedding is vocabulary-sized (head sliced)"
    del proto

    # The same file runs in onnxruntime and matches the module it was exported from.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, seq.seq_len), generator=g, dtype=torch.int32)
    mask = torch.ones(2, seq.seq_len, dtype=torch.bool)
    mask[:, :5] = False
    with torch.inference_mode():
        ref = graph(ids, mask).numpy()
    del graph
    gc.collect()
    out = torch.empty(2, seq.n_image, cfg.layout.codebook)
    OrtDenoiser(path)(ids, mask, out)
    m = compare(out.numpy(), ref)
    assert m["rel_err"] < 1e-4 and m["top1"] == 1.0, m
