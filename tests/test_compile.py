"""``precision.compile: true`` (torch.compile of the transformer layers) on CPU: same numbers as
eager, one compiled graph for all layers, and a compiled tensor-parallel distillation run that
follows the eager single-process curve.

fp32 on CPU; inductor's C++ kernels reorder reductions, so compiled and eager agree to rounding
(tolerances below: rel 1e-5 on losses and gradient norms as in test_distill.py, 1e-4 relative on
individual gradients). Inductor's code generation is checked once, in process (tens of seconds
of C++ compilation on a fresh cache); the graph-count and multi-rank checks use the
``aot_eager`` backend (KDTRAIN_COMPILE_BACKEND), which captures the same graphs through dynamo
and AOTAutograd without generating code.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from conftest import read_metrics, run_spawn, run_torchrun

pytestmark = pytest.mark.slow
RTOL, ATOL = 1e-5, 1e-7


def _build_pair(cfg, groups):
    from kdtrain.models import build_gpt

    eager = build_gpt(cfg, groups, device=torch.device("cpu"), dtype=torch.float32, seed=5)
    compiled = build_gpt(cfg, groups, device=torch.device("cpu"), dtype=torch.float32, seed=5, compile=True)
    return eager, compiled


def _compile_matches_eager(rank, world):
    from torch._dynamo.utils import counters

    from kdtrain.config import load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups

    base = load_model_config("tiny")
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    tokens = torch.randint(0, base.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, -1)

    # Inductor (C++ on CPU): forward and backward equal eager's.
    eager, compiled = _build_pair(dataclasses.replace(base, num_layers=2), groups)
    for model in (eager, compiled):
        logits = model(tokens, pos, None)
        (logits.float().square().mean() + logits.float().logsumexp(-1).mean()).backward()
        model.logits = logits.detach()
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(layer._compiled_call_impl is not None for layer in compiled.decoder.layers)

    # Graph counts (aot_eager: same capture, no code generation): parameters are graph inputs, so
    # a deeper model reuses the same graphs, one for training and one for the teacher's no-grad
    # forward (per-layer recompilation would hit dynamo's recompile limit and fall back to eager).
    os.environ["KDTRAIN_COMPILE_BACKEND"] = "aot_eager"
    graphs = {}
    for layers in (2, 5):
        torch._dynamo.reset()
        counters.clear()
        eager, compiled = _build_pair(dataclasses.replace(base, num_layers=layers), groups)
        compiled(tokens, pos, None).sum().backward()
        with torch.no_grad():
            torch.testing.assert_close(compiled(tokens, pos, None), eager(tokens, pos, None), rtol=1e-5, atol=1e-6)
        graphs[layers] = counters["stats"]["unique_graphs"]
    assert graphs == {2: 2, 5: 2}, graphs


def test_compiled_layers_match_eager_and_compile_once(tmp_path):
    run_spawn(1, _compile_matches_eager, tmp_path=tmp_path)


def test_compiled_tp2_distillation_follows_eager_single_process(tiny_corpus, tmp_path):
    """Colocated teacher TP=2 (no-grad compiled forward) and student TP=2 (compiled training):
    with tp > 1 megatron's column-parallel linears stay eager (their backward all-reduce is
    asynchronous, which dynamo does not trace), so this also covers a layer split into pieces."""
    common = ["--config", "tiny", f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={tiny_corpus['tokenizer']}"]
    run_torchrun(1, "distill_gpt.py", [*common, f"logging.dir={tmp_path / 'eager'}"])
    proc = run_torchrun(2, "distill_gpt.py", [*common, f"logging.dir={tmp_path / 'compiled'}", "teacher.tp=2",
                                              "student.tp=2", "precision.compile=true"],
                        env={"KDTRAIN_COMPILE_BACKEND": "aot_eager", "TORCH_LOGS": "graph_breaks"})
    assert "compiled layers" in proc.stdout
    # The layers were captured, with breaks only where the tensor-parallel linears are.
    breaks = [line for line in proc.stderr.splitlines() if "Graph break in user code" in line]
    assert breaks and all("tensor_parallel/layers.py" in line for line in breaks), breaks[:5]
    ref, got = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert sorted(got) == sorted(ref)
    for s in sorted(ref):
        for k in ("loss", "kd_loss", "grad_norm"):
            assert got[s][k] == pytest.approx(ref[s][k], rel=RTOL, abs=ATOL), f"step {s} {k}: {got[s][k]} vs {ref[s][k]}"
