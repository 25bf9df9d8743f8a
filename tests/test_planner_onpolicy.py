"""The planner on on-policy runs (kdtrain/planner: ``Sampling``): the key/value cache it counts
is what the decoder allocates, the sampled steps' time enters each split as the distributed
logic dictates, and ``split: auto`` hands the run's on-policy settings over."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO
from kdtrain.config import load_model_config
from kdtrain.planner import get_profile, make_problem, search_plans
from kdtrain.planner.memory import ModelShape
from kdtrain.planner.problem import Layout
from kdtrain.planner.search import evaluate_colocated


def test_sampling_cache_bytes_are_what_the_decoder_allocates(world_of_one, monkeypatch):
    """On-policy memory: the planner's key/value cache is the decoder's (models/generate.py) on a
    built model: every 4-d tensor [seq + 1, rows, groups, head_dim] it allocates, summed."""
    from conftest import small_gpt
    from kdtrain.models.generate import sample_replies
    from kdtrain.planner.memory import layer_inference_bytes, sampling_bytes

    model = small_gpt("llama", 96, num_layers=3)
    rows, seq, prompt = 3, 20, 5
    # conftest.small_gpt's llama: 64 hidden units, 4 heads of 16 in 2 query groups, SwiGLU 96.
    shape = ModelShape("llama", layers=3, hidden=64, heads=4, groups=2, head_dim=16, ffn=96, vocab=96,
                       vocab_multiple=128, max_seq=64, layernorm=False, gated=True, learned_pos=False, tied=False,
                       bias=False, qkv_bias=False)
    assert model.decoder.layers[0].self_attention.num_query_groups_per_partition == shape.groups
    allocated = []
    real_empty = torch.empty

    def recording_empty(*size, **kw):
        out = real_empty(*size, **kw)
        if out.dim() == 4 and out.shape[0] == seq + 1:
            allocated.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(torch, "empty", recording_empty)
    windows = torch.randint(1, 96, (rows, seq + 1))
    sample_replies(model, windows, [[(prompt, seq + 1)]] * rows, vocab_size=96, temperature=1.0, seed=0,
                   sample_ids=range(rows))
    assert len(allocated) == 2 * 3
    whole = sampling_bytes(shape, 1, 1, 0, seq, rows, prompt, d=4)
    rest = layer_inference_bytes(shape, 1, rows * prompt, 4) + 3 * 4 * rows * shape.padded_vocab(1)
    assert whole - rest == pytest.approx(sum(allocated))
    # On pipeline stages each keeps its own layers' cache; tensor ranks a slice of the groups.
    assert sampling_bytes(shape, 2, 1, 0, seq, rows, prompt, 4) < whole


def test_onpolicy_steps_in_the_plan():
    """A fraction f of sampled steps: the colocated step grows by exactly f x the sampling time; a
    disaggregated teacher cannot hide any of it (it waits for the samples); the time scales with
    the decoded positions and the calls; the key/value cache of a whole replica's rows can make a
    plan not fit where smaller sampling calls do."""
    from kdtrain.planner import Sampling
    from kdtrain.planner.search import evaluate_disaggregated
    from kdtrain.planner.timing import sampling_time

    t, s = load_model_config("llama-3.1-8b"), load_model_config("llama-3.2-1b")
    data = make_problem(t, s, 8, 8, 4096, 64, 64)
    lays = (Layout(1, 1, 8), Layout(1, 1, 8))
    base = evaluate_colocated(data, *lays, 4, False)
    for f in (0.25, 1.0):
        p = make_problem(t, s, 8, 8, 4096, 64, 64, onpolicy=Sampling(f, 1024))
        plan = evaluate_colocated(p, *lays, 4, False)
        assert plan.sample_time > 0
        assert plan.step_time == pytest.approx(base.step_time + f * plan.sample_time)
        assert "sampling" in plan.describe()
        d0 = evaluate_disaggregated(data, Layout(1, 1, 4), Layout(1, 1, 4), 4, False)
        d1 = evaluate_disaggregated(p, Layout(1, 1, 4), Layout(1, 1, 4), 4, False)
        assert d1.step_time >= d0.step_time + f * d1.sample_time
    # Launch-bound decoding: every position costs one decode forward of host time.
    m, prof = ModelShape.of(s), get_profile("h100-80gb")
    one = sampling_time(m, 1, 1, 4096, 8, 1, 1024, prof)
    assert sampling_time(m, 1, 1, 4096, 8, 2, 1024, prof) == pytest.approx(2 * one)
    per_position = (one - sampling_time(m, 1, 1, 4096, 8, 1, 4096, prof)) / (4096 - 1023 - 1)
    assert per_position == pytest.approx(prof.decode_host_s(m.layers), rel=0.05)
    assert prof.decode_host_s(m.layers) == (m.layers + 1) * prof.layer_overhead_s  # not measured on the H100 yet
    # precision.cuda_graphs: a position's layers are one graph replay (models/decode_graph.py).
    assert sampling_time(m, 1, 1, 4096, 8, 1, 1024, prof, graphed=True) < one / 5
    # Memory: 2048 rows per step over 8 replicas = 256 rows of 8193 tokens in one call.
    big = dict(seq_len=8192, global_batch=2048)
    all_rows = make_problem(t, s, 8, 8, micro_batches=(1,), onpolicy=Sampling(0.5, 4096), topk=64, **big)
    calls = make_problem(t, s, 8, 8, micro_batches=(1,), onpolicy=Sampling(0.5, 4096, 16), topk=64, **big)
    whole = evaluate_colocated(all_rows, *lays, 1, True)
    chunked = evaluate_colocated(calls, *lays, 1, True)
    assert not whole.fits and chunked.fits, (whole.reject, chunked.describe())
    assert chunked.sample_time > whole.sample_time  # 16 calls instead of one
    with pytest.raises(ValueError, match="--prompt-len"):
        search_plans(make_problem(t, s, 8, 8, 4096, 64, 64, onpolicy=Sampling(0.5, 5000)))


def test_auto_split_plans_the_run_s_onpolicy_steps():
    """``split.mode: auto`` hands the on-policy settings to the planner: the plan's step includes
    the sampled steps' decoding."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.auto_split import resolve_auto_split

    lines = {}
    for fraction in ("0.0", "0.5"):
        cfg = load_distill_config(str(REPO / "configs/distill/tiny.yaml"), [
            "split.mode=auto", f"onpolicy.fraction={fraction}", "onpolicy.prompt_length=8", "data.mock=true",
            "data.path=[]", "split.profile=h100-80gb", "training.micro_batch_size=2"])
        lines[fraction] = resolve_auto_split(cfg, 2, torch.device("cpu"), gpus_per_node=2)[1][0]
    assert "sampling" not in lines["0.0"] and "ms per sampled step" in lines["0.5"], lines
