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
