"""CUDA-graphed layers (kdtrain/models/cuda_graphs.py) on CPU: the wrapping, dispatch and gradient
flow, with a capture function that emulates ``torch.cuda.make_graphed_callables``' buffer
semantics (the real capture runs in tests/test_cuda_graphs_gpu.py).

The emulation keeps, per graphed layer, one static input, one static output and one set of static
gradient buffers, overwritten by every replay, and a backward that differentiates the most recent
forward (a real backward replay reads the activations the last forward replay left in the graph's
memory pool). Buffers are overwritten in place, so a consumer that reads one after it was
overwritten (a second forward before the first backward, a static output kept across
micro-batches) fails autograd's saved-tensor version check instead of training silently on stale
values, as it would on the GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.autograd.function import once_differentiable


def emulate_graphed_callables(callables, sample_args):
    """CPU stand-in for ``torch.cuda.make_graphed_callables`` (see the module docstring)."""
    return [_emulate_one(func, args) for func, args in zip(callables, sample_args)]


def _emulate_one(func, args):
    assert not (func._forward_hooks or func._forward_pre_hooks or func._backward_hooks)
    params = tuple(func.parameters())
    static_in = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    surface = static_in + params
    store: dict = {}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for s, x in zip(static_in, inputs[:len(static_in)]):
                s.detach().copy_(x)
            with torch.enable_grad():
                y = func(*static_in)
            store["y"] = y
            out = store.setdefault("out", torch.empty_like(y))
            out.copy_(y.detach())
            return out.detach()

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            need = [t for t in surface if t.requires_grad]
            grads = torch.autograd.grad(store["y"], need, grad, retain_graph=True)  # an unused input: error
            bufs = store.setdefault("grads", [torch.empty_like(g) for g in grads])
            for b, g in zip(bufs, grads):
                b.copy_(g)
            it = iter(bufs)
            return tuple(next(it).detach() if t.requires_grad else None for t in surface)

    return lambda *user_args: Graphed.apply(*user_args, *params)


class CountingCapture:
    """The emulated capture, recording what it was given and how often each graph replays."""

    def __init__(self):
        self.calls = []
        self.replays = 0

    def __call__(self, bodies, samples):
        self.calls.append((bodies, samples))
        inner = emulate_graphed_callables(bodies, samples)

        def counted(g):
            def run(x):
                self.replays += 1
                return g(x)
            return run

        return [counted(g) for g in inner]


def _role(model_name: str, over: dict, seed: int = 5, device=torch.device("cpu"), dtype=torch.float32,
          cuda_graphs: bool = False, seq_length: int = 16, micro_batch: int = 2):
    from kdtrain.config import OptimizerConfig, load_model_config
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable

    cfg = dataclasses.replace(load_model_config(model_name), **over)
    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    role = build_trainable(cfg, groups, OptimizerConfig(lr=3e-3, warmup_steps=0), seq_length=seq_length,
                           micro_batch=micro_batch, device=device, dtype=dtype, seed=seed, cuda_graphs=cuda_graphs)
    return cfg, groups, role


def _graph(role, capture):
    from kdtrain.models.cuda_graphs import attach_layer_graphs, capture_layer_graphs

    graphs = attach_layer_graphs(role.model, capture=capture)
    assert capture_layer_graphs(role.model, micro_batch=2, seq_length=16)
    return graphs


def _train(cfg, groups, role, steps: int = 3, seq_length: int = 16, micro_batch: int = 2):
    """``steps`` optimizer steps of four micro-batches; the losses."""
    from kdtrain.data.mock import MockWindowDataset
    from kdtrain.training.batches import microbatches
    from kdtrain.training.pretrain import LM_REPORT_KEYS, lm_forward_step
    from kdtrain.training.step import train_step

    ds = MockWindowDataset(seq_length, cfg.vocab_size, 0)
    forward_step = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    device = role.grads.data.device
    losses = []
    for _ in range(steps):  # one global batch again and again: the loss must fall
        mbs = microbatches(ds.train_sample, 0, 4 * micro_batch, micro_batch, 0, 1, device)
        result = train_step(role.schedule, forward_step, mbs, role.grads, role.optimizer, groups, 3e-3, 1.0,
                            cfg.tie_embeddings, LM_REPORT_KEYS)
        losses.append(result.sums["loss_sum"] / result.sums["tokens"])
    return losses


FAMILIES = {
    "llama (rope, GQA)": ("tiny", {}),
    "gpt2 (learned positions, biases)": ("gpt2-124m", dict(num_layers=3, hidden_size=64, num_attention_heads=4,
                                                          num_query_groups=4, ffn_hidden_size=96, kv_channels=None,
                                                          vocab_size=300, max_seq_length=64)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graphed_training_equals_eager(world_of_one, family):
    """Three optimizer steps of four micro-batches: the same losses and weights, bitwise, as the
    eager direct forward, with every training call of every layer replayed from its graph."""
    name, over = FAMILIES[family]
    cfg, groups, eager = _role(name, over)
    _, _, graphed = _role(name, over)
    capture = CountingCapture()
    _graph(graphed, capture)
    assert len(capture.calls) == 1
    bodies, samples = capture.calls[0]
    assert [b.layer for b in bodies] == list(graphed.model.decoder.layers)
    assert all(s[0].shape == (16, 2, cfg.hidden_size) and s[0].requires_grad for s in samples)
    replays_at_capture = capture.replays

    want, got = _train(cfg, groups, eager), _train(cfg, groups, graphed)
    assert got == want, (got, want)
    assert want[-1] < want[0], "the model must learn for the comparison to mean something"
    for (spec, p), (_, q) in zip(eager.params, graphed.params):
        assert torch.equal(p, q), spec.global_name
    # 3 steps x 4 micro-batches x every layer, from the graphs (the capture's own forward before).
    assert capture.replays - replays_at_capture == 3 * 4 * cfg.num_layers


def test_calls_outside_the_captured_case_run_eagerly(world_of_one):
    """Evaluation (eval mode, no grad), another micro-batch shape: eager and correct; the graphs
    are still used for training calls afterwards."""
    cfg, groups, role = _role("tiny", {})
    capture = CountingCapture()
    graphs = _graph(role, capture)
    model = role.model
    tokens = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(3, -1)

    before = capture.replays
    want = None
    for layer in model.decoder.layers:
        layer.graphs = None
    model.eval()
    with torch.no_grad():
        want = model(tokens, pos, None)
    for layer in model.decoder.layers:
        layer.graphs = graphs
    with torch.no_grad():
        assert torch.equal(model(tokens, pos, None), want)
    model.train()
    out = model(tokens, pos, None)  # batch 3, captured for 2: eager
    out.float().sum().backward()
    assert capture.replays == before
    assert len(capture.calls) == 1, "no second capture"
    _train(cfg, groups, role, steps=1)
    assert capture.replays == before + 4 * cfg.num_layers


def test_emulation_catches_a_second_forward_before_backward(world_of_one):
    """The emulated buffers are not a no-op: a replay before the previous micro-batch's backward
    (what pp > 1 would do) is an error here, as it is silent corruption on the GPU."""
    cfg, _, role = _role("tiny", {})
    _graph(role, emulate_graphed_callables)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(16).expand(2, -1)
    first = role.model(tokens, pos, None)
    role.model(tokens.flip(0), pos, None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.float().sum().backward()


def test_a_failed_capture_names_the_option(world_of_one):
    from kdtrain.models.cuda_graphs import attach_layer_graphs, capture_layer_graphs

    def refuse(bodies, samples):
        raise RuntimeError("operation not permitted when stream is capturing")

    _, _, role = _role("tiny", {})
    attach_layer_graphs(role.model, capture=refuse)
    with pytest.raises(RuntimeError, match="precision.cuda_graphs: capturing .* failed .*not permitted"):
        capture_layer_graphs(role.model, micro_batch=2, seq_length=16)
    assert not role.model.decoder.layers[0].graphs.armed  # later calls run eagerly


def test_unsupported_runs_are_clear_errors():
    from kdtrain.models.cuda_graphs import check_graph_support
    from kdtrain.parallel import RoleLayout

    cuda, one = torch.device("cuda"), RoleLayout("student", 0, 1, 1, 1)
    with pytest.raises(ValueError, match="precision.cuda_graphs: CUDA graphs need a CUDA device"):
        check_graph_support(one, torch.device("cpu"), compile=False, use_te=False)
    with pytest.raises(ValueError, match="precision.compile are exclusive"):
        check_graph_support(one, cuda, compile=True, use_te=False)
    with pytest.raises(ValueError, match="Transformer Engine"):
        check_graph_support(one, cuda, compile=False, use_te=True)
    with pytest.raises(ValueError, match="needs pp=1 for the student"):
        check_graph_support(RoleLayout("student", 0, 1, 2, 1), cuda, compile=False, use_te=False)
    with pytest.raises(ValueError, match="needs tp=1 for the student"):
        check_graph_support(RoleLayout("student", 0, 2, 1, 1), cuda, compile=False, use_te=False)
    check_graph_support(RoleLayout("student", 0, 1, 1, 4), cuda, compile=False, use_te=False)  # dp is fine


def test_cuda_graphs_on_cpu_is_a_config_error(world_of_one, tmp_path):
    from kdtrain.config import load_pretrain_config
    from kdtrain.training.pretrain import pretrain

    cfg = load_pretrain_config("tiny", ["data.mock=true", "precision.device=cpu", "precision.cuda_graphs=true",
                                        f"logging.dir={tmp_path}", "training.train_steps=1"])
    with pytest.raises(ValueError, match="precision.cuda_graphs: CUDA graphs need a CUDA device"):
        pretrain(cfg)


def test_distillation_with_graphed_student_equals_eager(world_of_one, tmp_path, monkeypatch):
    """The distillation entry point (colocated teacher, fused-KD forward step, evaluation at the
    end) with ``precision.cuda_graphs=true``: the same loss curve, bitwise, as with eager layers.
    On CPU the capture is the emulation above and the CUDA-only check is lifted."""
    import kdtrain.models.gpt as gpt
    from conftest import read_metrics
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill

    capture = CountingCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    monkeypatch.setattr(gpt, "check_graph_support", lambda *args, **kwargs: None)

    def run(name: str, graphs: bool) -> dict:
        distill(load_distill_config("tiny", [
            "data.mock=true", "data.path=[]", "precision.device=cpu", "precision.dtype=fp32", "checkpoint.dir=null",
            f"logging.dir={tmp_path / name}", "training.train_steps=3", f"precision.cuda_graphs={graphs}"]))
        return read_metrics(tmp_path / name)

    want, got = run("eager", False), run("graphs", True)
    layers = 4  # configs/models/tiny.yaml
    assert len(capture.calls) == 1
    assert capture.replays == layers + 3 * 4 * layers  # the capture's own forward, then 3 steps x 4 micro-batches
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]
    assert [got[s]["grad_norm"] for s in sorted(got)] == [want[s]["grad_norm"] for s in sorted(want)]
    valid = [{s: r["valid_loss"] for s, r in read_metrics(tmp_path / name, "valid").items()}
             for name in ("graphs", "eager")]
    assert valid[0] == valid[1] and valid[0]  # the final evaluation (eval mode, no grad) runs eagerly


def test_distillation_with_both_options_graphs_the_student_and_compiles_the_teacher(world_of_one, tmp_path,
                                                                                      monkeypatch, capsys):
    """precision.cuda_graphs + precision.compile in distillation: the student's layers are graphed
    (not compiled), the teacher's compiled, and the loss curve is the eager one (aot_eager backend:
    the same operations through dynamo and AOTAutograd, no generated code)."""
    import kdtrain.models.gpt as gpt
    from conftest import read_metrics
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill

    capture = CountingCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    monkeypatch.setattr(gpt, "check_graph_support", lambda *args, **kwargs: None)
    monkeypatch.setenv("KDTRAIN_COMPILE_BACKEND", "aot_eager")
    compiled = []
    real_compile = gpt.compile_layers
    monkeypatch.setattr(gpt, "compile_layers", lambda model: compiled.append(model) or real_compile(model))

    def run(name: str, extra: list[str]) -> dict:
        distill(load_distill_config("tiny", [
            "data.mock=true", "data.path=[]", "precision.device=cpu", "precision.dtype=fp32", "checkpoint.dir=null",
            f"logging.dir={tmp_path / name}", "training.train_steps=3", *extra]))
        return read_metrics(tmp_path / name)

    want = run("eager", [])
    capsys.readouterr()
    got = run("both", ["precision.cuda_graphs=true", "precision.compile=true"])
    assert "compiled teacher layers, CUDA-graphed student layers" in capsys.readouterr().out
    (teacher,) = compiled
    assert all(layer.graphs is None and layer._compiled_call_impl is not None for layer in teacher.decoder.layers)
    (bodies, _), = capture.calls
    assert all(b.layer._compiled_call_impl is None for b in bodies)  # the student's layers: graphed only
    assert capture.replays == 4 + 3 * 4 * 4
    for s in sorted(want):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-6)
        assert got[s]["grad_norm"] == pytest.approx(want[s]["grad_norm"], rel=1e-6)
