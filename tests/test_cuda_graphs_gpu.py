"""CUDA-graphed layers on the GPU (``precision.cuda_graphs``, kdtrain/models/cuda_graphs.py): the
real ``torch.cuda.make_graphed_callables`` capture trains like the eager direct forward, and every
training call of every layer replays its graph. The same integration runs on CPU with an emulated
capture in tests/test_cuda_graphs.py; the distillation entry point with graphed student layers is
checked for host syncs in tests/test_sync_free_gpu.py.

    pytest -q -s -m gpu tests/test_cuda_graphs_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from test_cuda_graphs import _role, _train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPE = dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=704,
             vocab_size=1024, max_seq_length=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graphed_layers_train_like_eager_on_cuda(world_of_one, dtype):
    cuda = torch.device("cuda")
    kw = dict(device=cuda, dtype=dtype, seq_length=128, micro_batch=4)
    cfg, groups, eager = _role("tiny", SHAPE, **kw)
    _, _, graphed = _role("tiny", SHAPE, cuda_graphs=True, **kw)
    graphs = graphed.model.decoder.layers[0].graphs
    assert graphs is not None and graphs.graphed is not None, "build_trainable must capture the graphs"
    replays = [0]

    def counted(g):
        def run(x):
            replays[0] += 1
            return g(x)
        return run

    graphs.graphed = [counted(g) for g in graphs.graphed]
    want = _train(cfg, groups, eager, seq_length=128, micro_batch=4)
    got = _train(cfg, groups, graphed, seq_length=128, micro_batch=4)
    assert replays[0] == 3 * 4 * cfg.num_layers
    assert want[-1] < want[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    diffs = [float((p.float() - q.float()).abs().max()) for (_, p), (_, q) in zip(eager.params, graphed.params)]
    print(f"\n[{dtype}] losses eager {want} graphed {got}; bitwise losses: {got == want}; "
          f"max |param diff| {max(diffs):.3g}")
    assert worst < tol, (got, want)
    assert max(diffs) < (1e-4 if dtype == torch.float32 else 5e-2)


def test_graphed_decoding_samples_what_eager_decoding_samples(world_of_one, monkeypatch):
    """On-policy sampling with ``graphs=True`` (models/decode_graph.py): each position's forward is
    captured once and replayed, and the rows equal those of the same fixed-shape step run eagerly
    (the same kernels). Prints the time of a sampling call with the ordinary decoder, the eager
    fixed-shape step and the graphs."""
    import time

    import kdtrain.models.decode_graph as decode_graph
    from kdtrain.config import ModelConfig
    from kdtrain.models import build_gpt
    from kdtrain.models.generate import sample_replies
    from kdtrain.parallel import RoleLayout, build_role_groups

    cuda = torch.device("cuda")
    cfg = ModelConfig(name="decode", **SHAPE)
    cfg.check()
    model = build_gpt(cfg, build_role_groups(RoleLayout("decode", 0, 1, 1, 1)), device=cuda, dtype=torch.bfloat16,
                      seed=0)
    windows = torch.randint(1, cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(0)).to(cuda)
    spans = [[(16 + 4 * i, 129)] for i in range(8)]
    kw = dict(vocab_size=cfg.vocab_size, temperature=1.0, seed=3, sample_ids=range(8), top_p=0.95)
    replays = [0]
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda g: (replays.__setitem__(0, replays[0] + 1), replay(g))[1])

    def timed(graphs: bool):
        sample_replies(model, windows, spans, graphs=graphs, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = sample_replies(model, windows, spans, graphs=graphs, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, rows

    t_plain, _ = timed(False)
    t_graph, graphed = timed(True)
    assert replays[0] > 200  # every single-position forward of both calls replayed
    init = decode_graph.DecodeStep.__init__
    monkeypatch.setattr(decode_graph.DecodeStep, "__init__",
                        lambda self, *a, graph, **k: init(self, *a, graph=False, **k))
    t_static, eager = timed(True)
    for a, b in zip(graphed, eager):
        assert (a is None and b is None) or torch.equal(a, b)
    print(f"\n8 rows x 113-128 sampled positions, {cfg.num_layers} layers, bf16: ordinary decoder "
          f"{t_plain * 1e3:.1f} ms, fixed-shape eager {t_static * 1e3:.1f} ms, graphed {t_graph * 1e3:.1f} ms")
