"""kdtrain's direct transformer-layer forward (kdtrain/models/layer.py) computes exactly what
megatron-core's stock ``TransformerLayer.forward`` computes: bitwise-equal logits and parameter
gradients on CPU, for every layer family the model configs describe, with dropout, in bf16, and
tensor-parallel. The stock forward is the reference: the same built model is run with each
layer's ``_direct`` switched off, so parameters, inputs and RNG state are identical.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import run_spawn

# Shrunk copies of the shipped model families (what differs is the layer's structure).
SMALL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, kv_channels=None,
             vocab_size=300, max_seq_length=64)
FAMILIES = {
    "llama (rmsnorm, swiglu, GQA, rope scaling)": ("llama-3.2-1b", dict(num_query_groups=2)),
    "gpt2 (layernorm, gelu_tanh, biases, learned positions)": ("gpt2-124m", dict(num_query_groups=4)),
    "exact gelu": ("gpt2-124m", dict(num_query_groups=4, activation="gelu")),
    "qwen2.5 (qkv bias only, tied embeddings)": ("qwen2.5-0.5b", dict(num_query_groups=2)),
    "qwen3 (query/key norms, head dim != hidden/heads)": ("qwen3-0.6b", dict(num_query_groups=2, kv_channels=24)),
    "tiny with dropout": ("tiny", dict(hidden_dropout=0.1, attention_dropout=0.1)),
}


def _model(name: str, over: dict, groups, dtype=torch.float32, seed: int = 3):
    from kdtrain.config import load_model_config
    from kdtrain.models import build_gpt

    cfg = load_model_config(name)
    cfg = dataclasses.replace(cfg, **{**(SMALL if name != "tiny" else {}), **over})
    return cfg, build_gpt(cfg, groups, device=torch.device("cpu"), dtype=dtype, seed=seed)


def _run(model, cfg, direct: bool, dropout_seed: int = 0):
    """Logits and parameter gradients of one training forward/backward."""
    for layer in model.decoder.layers:
        layer._direct = direct
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, -1)
    torch.manual_seed(dropout_seed)
    logits = model(tokens, pos, None)
    loss = logits.float().square().mean() + logits.float().logsumexp(-1).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(direct, stock, what: str):
    assert torch.equal(direct[0], stock[0]), f"{what}: logits differ by {(direct[0] - stock[0]).abs().max()}"
    for name, g in direct[1].items():
        assert torch.equal(g, stock[1][name]), f"{what}: grad of {name} differs by {(g - stock[1][name]).abs().max()}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_direct_layer_equals_stock_megatron_layer(world_of_one, family):
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    name, over = FAMILIES[family]
    cfg, model = _model(name, over, groups)
    assert all(layer._direct for layer in model.decoder.layers), "the direct forward must cover this family"
    model.train()
    _assert_same(_run(model, cfg, True), _run(model, cfg, False), family)
    if cfg.hidden_dropout > 0:  # the masks do apply: other masks give other logits
        assert not torch.equal(_run(model, cfg, True)[0], _run(model, cfg, True, dropout_seed=1)[0])


@pytest.mark.parametrize("family", ["llama (rmsnorm, swiglu, GQA, rope scaling)",
                                    "gpt2 (layernorm, gelu_tanh, biases, learned positions)"])
def test_direct_layer_bf16_and_no_grad(world_of_one, family):
    """bf16 models hold every parameter in bf16 (megatron-core creates norms and the position
    embedding in fp32, which made a bf16 GPT-2 fail in its first linear); then as above."""
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    cfg, model = _model(*FAMILIES[family], groups, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_same(_run(model, cfg, True), _run(model, cfg, False), "bf16")
    # The teacher's path: no-grad and inference-mode forwards, then training again. The rotary
    # cos/sin cache is keyed on the mode (an inference tensor cannot be saved for backward).
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    pos = torch.arange(24).expand(2, -1)
    outs = {}
    for direct in (True, False):
        for layer in model.decoder.layers:
            layer._direct = direct
        with torch.inference_mode():
            outs[direct, "inference"] = model(tokens, pos, None)
        with torch.no_grad():
            outs[direct, "no_grad"] = model(tokens, pos, None)
    for mode in ("inference", "no_grad"):
        assert torch.equal(outs[True, mode], outs[False, mode]), mode
    _assert_same(_run(model, cfg, True), _run(model, cfg, False), "training after inference mode")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_direct_layer_equals_stock_on_cuda(world_of_one):
    """On the GPU (bf16, SDPA's flash kernels, cuBLAS): the same operations, so the same numbers;
    equality is asserted to bf16 rounding and reported when it is exact."""
    from kdtrain.config import load_model_config
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    cfg = dataclasses.replace(load_model_config("llama-3.2-1b"), num_layers=2, hidden_size=256,
                              num_attention_heads=8, num_query_groups=2, kv_channels=None, ffn_hidden_size=512,
                              vocab_size=1000, max_seq_length=512)
    model = build_gpt(cfg, groups, device=torch.device("cuda"), dtype=torch.bfloat16, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    pos = torch.arange(256, device="cuda").expand(2, -1)
    res = {}
    for direct in (True, False):
        for layer in model.decoder.layers:
            layer._direct = direct
        model.zero_grad(set_to_none=True)
        logits = model(tokens, pos, None)
        (logits.float().square().mean() + logits.float().logsumexp(-1).mean()).backward()
        res[direct] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    exact = torch.equal(res[True][0], res[False][0]) and all(
        torch.equal(g, res[False][1][n]) for n, g in res[True][1].items())
    print(f"direct vs stock layer forward on {torch.cuda.get_device_name()}: bitwise equal = {exact}")
    torch.testing.assert_close(res[True][0], res[False][0], rtol=1.6e-2, atol=1e-2)
    for name, g in res[True][1].items():
        torch.testing.assert_close(g, res[False][1][name], rtol=1.6e-2, atol=1e-4, msg=lambda m: f"{name}: {m}")


def _tp2_equal(rank, world):
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 2, 1, 1))
    for name, over in (FAMILIES["llama (rmsnorm, swiglu, GQA, rope scaling)"],
                       FAMILIES["gpt2 (layernorm, gelu_tanh, biases, learned positions)"],
                       FAMILIES["qwen3 (query/key norms, head dim != hidden/heads)"],
                       FAMILIES["tiny with dropout"]):
        cfg, model = _model(name, over, groups)
        assert all(layer._direct for layer in model.decoder.layers)
        _assert_same(_run(model, cfg, True), _run(model, cfg, False), f"{name} tp=2 rank {rank}")


def test_direct_layer_equals_stock_tensor_parallel(tmp_path):
    run_spawn(2, _tp2_equal, tmp_path=tmp_path)



def _tp2_layer_choice(rank, world):
    import kdtrain.models.gpt as gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    def te_spec(*args, **kwargs):
        raise RuntimeError("Transformer Engine layers")

    # Transformer Engine importable (on CPU, pretend), building its layers a recognisable error.
    gpt.transformer_engine_available = lambda device: True
    gpt.get_gpt_layer_with_transformer_engine_spec = te_spec
    groups = build_role_groups(RoleLayout("model", 0, 2, 1, 1))
    # A model that trains with attention dropout at tp=2 gets the local layers, whose SDPA draws
    # per tensor rank (TE's attention would drop the same positions of head h on both ranks).
    _, model = _model(*FAMILIES["tiny with dropout"], groups)
    assert all(layer._direct for layer in model.decoder.layers)
    # Without attention dropout, and for a model that never trains, TE stays the default.
    with pytest.raises(RuntimeError, match="Transformer Engine layers"):
        _model("tiny", dict(hidden_dropout=0.1, attention_dropout=0.0), groups)
    from kdtrain.config import load_model_config

    dropout = dataclasses.replace(load_model_config("tiny"), attention_dropout=0.1)
    assert gpt.transformer_engine_layers(dropout, 2, torch.device("cpu"), trains=False)
    assert not gpt.transformer_engine_layers(dropout, 2, torch.device("cpu"))
    assert gpt.transformer_engine_layers(dropout, 1, torch.device("cpu"))


def test_attention_dropout_on_tensor_ranks_picks_local_layers_over_transformer_engine(tmp_path):
    run_spawn(2, _tp2_layer_choice, tmp_path=tmp_path)


def test_grouped_query_attention_with_a_mask_gives_each_head_its_groups_keys():
    """With an explicit mask (attention within documents) SDPA cannot run grouped query heads on
    CUDA's fast kernels, so each query head gets its group's key and value: the same result as
    SDPA's own grouped attention."""
    from types import SimpleNamespace

    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType

    from kdtrain.config import load_model_config
    from kdtrain.models import transformer_config
    from kdtrain.models.attention import SDPAttention

    cfg = dataclasses.replace(load_model_config("tiny"), num_attention_heads=4, num_query_groups=2)
    group = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    attn = SDPAttention(transformer_config(cfg, 1, 1, torch.float32, torch.device("cpu")), 1, AttnMaskType.causal,
                        "self", pg_collection=SimpleNamespace(tp=group))
    g = torch.Generator().manual_seed(0)
    d = cfg.hidden_size // 4
    q, k, v = torch.randn(16, 2, 4, d, generator=g), torch.randn(16, 2, 2, d, generator=g), torch.randn(16, 2, 2, d,
                                                                                                         generator=g)
    segment = torch.tensor([0] * 6 + [1] * 10)
    mask = (segment[:, None] == segment[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=mask,
                                         enable_gqa=True).permute(2, 0, 1, 3).reshape(16, 2, -1)
    torch.testing.assert_close(attn(q, k, v, mask), ref, rtol=1e-6, atol=1e-6)


def test_attention_dropout_draws_independent_masks_on_each_tensor_rank():
    """With several tensor ranks each holds other heads: their attention dropout must draw
    independent masks (the same inputs give other outputs on each rank), while the ranks' shared
    generator stream (hidden dropout's) stays in step: advanced alike on every rank, and a rerun
    from the same state (recomputation, a resume) draws the same masks again."""
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from kdtrain.config import load_model_config
    from kdtrain.models import transformer_config
    from kdtrain.models.attention import SDPAttention

    cfg = dataclasses.replace(load_model_config("tiny"), attention_dropout=0.5)
    tcfg = transformer_config(cfg, 2, 1, torch.float32, torch.device("cpu"))

    def attention(tp: int, rank: int) -> SDPAttention:
        group = SimpleNamespace(size=lambda: tp, rank=lambda: rank)
        return SDPAttention(tcfg, 1, AttnMaskType.causal, "self", pg_collection=SimpleNamespace(tp=group))

    heads, d = cfg.num_attention_heads // 2, cfg.hidden_size // cfg.num_attention_heads
    q, k, v = torch.randn(3, 16, 2, heads, d, generator=torch.Generator().manual_seed(0)).unbind(0)
    out, states = {}, {}
    for tp, rank in ((2, 0), (2, 1), (1, 0)):
        torch.manual_seed(7)
        out[tp, rank] = attention(tp, rank)(q, k, v, None)
        states[tp, rank] = torch.get_rng_state()
    assert not torch.equal(out[2, 0], out[2, 1])
    assert torch.equal(states[2, 0], states[2, 1])
    torch.manual_seed(7)
    assert torch.equal(attention(2, 1)(q, k, v, None), out[2, 1])
    # Dropout is on: without it the outputs agree on every rank.
    assert not torch.equal(out[2, 0], attention(2, 0).eval()(q, k, v, None))


def test_unsupported_configs_use_the_stock_forward(world_of_one):
    """A config the direct forward does not cover builds a layer that runs megatron's forward."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from kdtrain.models.layer import DirectTransformerLayer, direct_forward_supported
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    cfg, model = _model("tiny", {}, groups)
    layer = model.decoder.layers[0]
    assert isinstance(layer, DirectTransformerLayer) and direct_forward_supported(layer)
    for field, value in (("recompute_granularity", "selective"), ("rotary_interleaved", True),
                         ("fp32_residual_connection", True)):
        original = getattr(layer.config, field)
        setattr(layer.config, field, value)
        try:
            assert not direct_forward_supported(layer), field
        finally:
            setattr(layer.config, field, original)
    # A call the direct forward does not handle (here an extra keyword) reaches the stock one.
    calls = []
    stock = TransformerLayer.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("dynamic_inference_decode_only"))
        return stock(self, *args, **kwargs)

    TransformerLayer.forward = spy
    try:
        x = torch.randn(8, 1, cfg.hidden_size)
        out, _ = layer(x, attention_mask=None, dynamic_inference_decode_only=False)
        ref, _ = layer(x, attention_mask=None)
    finally:
        TransformerLayer.forward = stock
    assert calls == [False] and torch.equal(out, ref)


def test_layer_host_benchmark_cpu_smoke(tmp_path):
    """benchmarks/bench_layer_host.py --cpu-tiny: stock, direct and Hugging Face rows, every time
    measured (the figures themselves are the benchmark's business, not a test's)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "benchmarks/bench_layer_host.py", "--cpu-tiny", "--steps", "3",
                    "--out", str(tmp_path)], cwd=repo, check=True, timeout=300, capture_output=True)
    rows = json.loads((tmp_path / "layer_host.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["megatron-core stock forward", "kdtrain (direct forward)",
                                           "Hugging Face LlamaDecoderLayer"]
    assert all(r[k] > 0 for r in rows for k in r if k.endswith("_ms_per_layer"))


def _qk_norm_grads_tp1_vs_tp2(rank, world):
    """One training step of a query/key-norm model at TP=1 (each rank alone) and TP=2: the norm
    weights' gradients, which each tensor rank holds only for its own heads, are summed over the
    tensor-parallel group (GradBuffer.reduce_tp_partial) and equal the TP=1 gradients."""
    from kdtrain.config import OptimizerConfig
    from kdtrain.data.mock import MockWindowDataset
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.batches import microbatches
    from kdtrain.training.pretrain import LM_REPORT_KEYS, build_trainable, lm_forward_step
    from kdtrain.training.step import train_step

    name, over = FAMILIES["qwen3 (query/key norms, head dim != hidden/heads)"]
    from kdtrain.config import load_model_config

    cfg = dataclasses.replace(load_model_config(name), **{**SMALL, **over})
    grads = {}
    solo = [build_role_groups(RoleLayout("solo0", 0, 1, 1, 1)), build_role_groups(RoleLayout("solo1", 1, 1, 1, 1))]
    for layout, groups in (("tp1", solo[rank]), ("tp2", build_role_groups(RoleLayout("tp2", 0, 2, 1, 1)))):
        role = build_trainable(cfg, groups, OptimizerConfig(lr=1e-3, warmup_steps=0), seq_length=16, micro_batch=2,
                               device=torch.device("cpu"), dtype=torch.float32, seed=5)
        mbs = microbatches(MockWindowDataset(16, cfg.vocab_size, 0).train_sample, 0, 4, 2, 0, 1, torch.device("cpu"))
        train_step(role.schedule, lm_forward_step(cfg.vocab_size, groups.pgc.tp), mbs, role.grads, role.optimizer,
                   groups, 1e-3, 0.0, cfg.tie_embeddings, LM_REPORT_KEYS)
        grads[layout] = {spec.global_name: g.clone() for spec, g in role.grads.named_main_grads()
                         if "_layernorm." in spec.global_name and "self_attention" in spec.global_name}
    assert len(grads["tp1"]) == 2 * cfg.num_layers
    for k, g in grads["tp1"].items():
        torch.testing.assert_close(grads["tp2"][k], g, rtol=1e-5, atol=1e-9, msg=lambda m: f"rank {rank} {k}: {m}")


def test_query_key_norm_gradients_are_summed_over_tensor_ranks(tmp_path):
    run_spawn(2, _qk_norm_grads_tp1_vs_tp2, tmp_path=tmp_path)
