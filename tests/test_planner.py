"""Split planner: exact static bytes against built megatron-core models, plan invariants, the
closed-form inflection condition against brute force, CLI, sweep plot, calibrate on CPU."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from conftest import REPO, run_spawn
from kdtrain.config import load_model_config
from kdtrain.planner import auto_plan, get_profile, load_profile, make_problem, save_profile, search_plans
from kdtrain.planner.inflection import condition
from kdtrain.planner.memory import (GiB, ModelShape, layer_activation_bytes, optimizer_bytes, owned_params,
                                    payload_nbytes, sharded_state_bytes, stage_param_list, stage_params,
                                    student_stage_memory, teacher_stage_memory)
from kdtrain.planner.problem import Layout
from kdtrain.planner.search import evaluate_colocated

F32, BF16 = torch.float32, torch.bfloat16
# (model, tp, pp, dp, distributed optimizer, dtype) on a world of 2 gloo ranks: every layout on the
# tiny model; the tied-embedding demo student with pp=2 (the last stage's own embedding copy) and
# bf16 (fp32 masters; every parameter, norms included, in bf16); the demo teacher sharded.
ONE_RANK = [("tiny", 1, 1, 1, False, F32), ("tiny", 1, 1, 1, False, BF16), ("demo-student", 1, 1, 1, False, BF16),
            ("demo-teacher", 1, 1, 1, False, F32), ("demo-teacher", 1, 1, 1, False, BF16)]
TWO_RANKS = [("tiny", 2, 1, 1, False, F32), ("demo-student", 1, 2, 1, False, BF16), ("tiny", 1, 1, 2, True, BF16),
             ("demo-teacher", 2, 1, 1, False, F32), ("demo-student", 1, 1, 2, True, F32)]


def _built_bytes(rank, world, out_dir, cases):
    """Build each case; assert planner bytes == allocated bytes on this rank."""
    import os

    os.environ["WORLD_SIZE"] = str(world)  # HyperCommGrid reads it before the process group
    from kdtrain.config import OptimizerConfig
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable

    checked = 0
    for name, tp, pp, dp, zero, dtype in cases:
        cfg = load_model_config(name)
        shape = ModelShape.of(cfg)
        groups = build_role_groups(RoleLayout("student", 0, tp, pp, dp))  # collective: every rank
        if not groups.is_member:
            continue
        role = build_trainable(cfg, groups, OptimizerConfig(distributed=zero), 16, 1, torch.device("cpu"),
                               dtype, seed=3)
        role.optimizer.step(1e-4)  # materialises Adam state (main grads are zero)
        d = 4 if dtype == torch.float32 else 2
        weights = sum(p.numel() * p.element_size() for p in role.model.parameters())
        sharded = role.grads.sharded
        grads = role.grads.data.numel() * role.grads.data.element_size()  # ``shard`` is a view of it
        opt = 0
        for s in role.optimizer.owned:
            st = role.optimizer.opt.state[s.master]
            opt += sum(st[k].numel() * st[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
            opt += 0 if s.master is s.param else s.master.numel() * s.master.element_size()
        if sharded:  # the all-gather's buffers
            opt += sum(t.numel() * t.element_size() for t in (role.optimizer._send, role.optimizer._recv))
        g = groups
        pred = student_stage_memory(shape, tp, pp, dp, g.pp_rank, 16, 1, 1, d=d, distributed_optimizer=zero)
        where = f"{name} tp{tp} pp{pp} dp{dp} zero={zero} {dtype} rank {rank}"
        assert weights == pred.weights, (where, weights, pred.weights)
        assert grads == pred.grads, (where, grads, pred.grads)
        # Exactly this dp rank's share, not only the worst one.
        if sharded:
            want = sharded_state_bytes(shape, tp, pp, g.pp_rank, dp, g.dp_rank, d)[1]
            assert sum(s.stop - s.start for s in role.optimizer.owned) == \
                owned_params(shape, tp, pp, g.pp_rank, dp)[g.dp_rank], where
        else:
            want = optimizer_bytes(stage_params(shape, tp, pp, g.pp_rank), d)
        assert opt == want, (where, opt, want)
        assert all(p.dtype == dtype for p in role.model.parameters()), where
        if g.dp_rank == 0:  # the planner's figure: rank 0's (a full chunk when sharded)
            assert opt == pred.optimizer, where
        # The lean teacher holds the same weights and nothing else static.
        tmem = teacher_stage_memory(shape, tp, pp, g.pp_rank, 16, 1, 8, d=d)
        assert tmem.weights == weights and tmem.grads == tmem.optimizer == 0, where
        checked += 1
    (out_dir / f"checked{rank}").write_text(str(checked))


def test_static_bytes_equal_built_models_one_rank(world_of_one, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # restored afterwards: later tests' workers must not inherit it
    _built_bytes(0, 1, tmp_path, ONE_RANK)
    assert int((tmp_path / "checked0").read_text()) == len(ONE_RANK)


def test_static_bytes_equal_built_models_two_ranks(tmp_path):
    """TP shards with padded vocab, pp=2 with the tied embedding's last-stage copy, ZeRO-1 shares."""
    run_spawn(2, _built_bytes, tmp_path, TWO_RANKS, tmp_path=tmp_path)
    assert [int((tmp_path / f"checked{r}").read_text()) for r in range(2)] == [len(TWO_RANKS)] * 2


def test_param_count_matches_model_config(world_of_one):
    for name in ("tiny", "demo-teacher", "gpt2-124m", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "qwen3-8b"):
        cfg = load_model_config(name)
        m = ModelShape.of(cfg)
        pad = (m.padded_vocab(1) - m.vocab) * m.hidden * (1 if m.tied else 2)
        assert stage_params(m, 1, 1, 0) == cfg.num_params() + pad, name
        # Shards add back up: tp-way shards times tp plus replicated norms, over all stages.
        tp, pp = 2, 2
        total = sum(stage_params(m, tp, pp, r) for r in range(pp))
        assert total > stage_params(m, 1, 1, 0) / tp
    # A built query/key-norm model has exactly the parameters the planner counts, in its order.
    import dataclasses

    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    cfg = dataclasses.replace(load_model_config("qwen3-0.6b"), num_layers=2, hidden_size=64, num_attention_heads=4,
                              num_query_groups=2, kv_channels=24, ffn_hidden_size=96, vocab_size=300)
    model = build_gpt(cfg, build_role_groups(RoleLayout("model", 0, 1, 1, 1)), device=torch.device("cpu"),
                      dtype=torch.float32, seed=0)
    assert tuple(p.numel() for p in model.parameters()) == stage_param_list(ModelShape.of(cfg), 1, 1, 0)


def test_payload_bytes_match_stream_spec():
    from kdtrain.stream import PayloadSpec

    for seq, mb, k, dt in ((7, 3, 5, torch.float32), (128, 2, 64, torch.bfloat16), (4096, 1, 1024, torch.float32)):
        spec = PayloadSpec(seq, mb, k, dt)
        assert payload_nbytes(seq, mb, k, 4 if dt == torch.float32 else 2) == spec.nbytes


def test_activation_and_zero_scaling():
    m = ModelShape.of(load_model_config("llama-3.2-1b"))
    a1 = student_stage_memory(m, 1, 1, 1, 0, 2048, 1, 8)
    a2 = student_stage_memory(m, 1, 1, 1, 0, 2048, 2, 8)
    assert a2.activations == pytest.approx(2 * a1.activations, rel=1e-9)
    # 1F1B: the first stage keeps pp micro-batches in flight, the last one.
    first, last = (student_stage_memory(m, 1, 4, 1, r, 2048, 1, 8) for r in (0, 3))
    per_layer = layer_activation_bytes(m, 1, 2048)
    p2p = 2 * 2 * 2048 * m.hidden
    assert first.activations == pytest.approx(4 * (m.layers // 4) * per_layer + p2p)
    assert last.activations > (m.layers // 4) * per_layer + 2 * 2 * 2048 * m.padded_vocab(1)  # + logits, grad
    z = student_stage_memory(m, 1, 1, 8, 0, 2048, 1, 8, distributed_optimizer=True)
    # m, v and master of an eighth of the elements (the 263M-element embedding, a fifth of this
    # model, put 1.7x the mean on its whole-parameter owner), plus the all-gather's buffers.
    buffers = 2 * 9 * min(-(-stage_params(m, 1, 1, 0) // 8), 2**26 // 8)
    assert z.optimizer == pytest.approx(a1.optimizer / 8 + buffers, rel=1e-6)
    assert z.grads == pytest.approx(a1.grads, rel=1e-6)  # the same buffer, padded to 8 equal chunks


def test_recompute_trades_memory_for_time():
    from kdtrain.planner.timing import Placement, student_time

    m = ModelShape.of(load_model_config("llama-3.2-1b"))
    plain = student_stage_memory(m, 1, 2, 1, 0, 4096, 1, 8)
    rc = student_stage_memory(m, 1, 2, 1, 0, 4096, 1, 8, recompute=True)
    n = 4096
    assert rc.static == plain.static
    # Full recomputation keeps each layer's input per micro-batch in flight, plus one live layer.
    assert rc.activations == pytest.approx(2 * (m.layers // 2) * 2 * n * m.hidden + layer_activation_bytes(m, 1, n)
                                           + 2 * 2 * n * m.hidden)
    prof, pl = get_profile("h100-80gb"), Placement(0, 8)
    t0, t1 = (student_time(m, 1, 2, 1, 4096, 1, 8, prof, pl, recompute=r) for r in (False, True))
    assert 1.2 < t1.compute / t0.compute < 4 / 3  # one more forward per backward; the output layer is not redone
    p = make_problem(load_model_config("llama-3.1-8b"), m, 8, 8, 4096, 64, 64, recompute=None)
    assert {pl.recompute for pl in search_plans(p).plans} == {False, True}


def test_graphed_student_layouts_and_host_time():
    """precision.cuda_graphs: every plan keeps the student at tp = pp = 1 without recomputation (what
    graphed layers need), and the graphs take the host bound off a launch-bound student."""
    from kdtrain.planner.timing import GRAPH_REPLAY_S, Placement, student_time

    t, s = load_model_config("llama-3.1-8b"), load_model_config("llama-3.2-1b")
    plain = search_plans(make_problem(t, s, 16, 8, 2048, 256, 64, recompute=None))
    assert any((pl.student.tp, pl.student.pp) != (1, 1) for pl in plain.plans)
    graphed = search_plans(make_problem(t, s, 16, 8, 2048, 256, 64, recompute=None, student_graphs=True))
    assert graphed.plans and {pl.split for pl in graphed.plans} == {"colocated", "disaggregated"}
    for plan in graphed.plans:
        assert (plan.student.tp, plan.student.pp, plan.recompute) == (1, 1, False), plan.describe()
    best, _ = auto_plan(t, s, 16, 8, 2048, 256, topk=64, recompute=None, student_graphs=True)
    assert (best.student_tp, best.student_pp) == (1, 1)
    with pytest.raises(ValueError, match="cuda_graphs"):
        search_plans(make_problem(t, s, 16, 8, 2048, 256, 64, recompute=True, student_graphs=True))

    # The 150M student of the benchmark pair at micro-batch 8 is bound by the host in eager mode
    # (3 passes x 14 layers x 1.9 ms against a smaller device time); graphed, by the device.
    m, prof, pl = ModelShape.of(load_model_config("llama-150m-32k")), get_profile("h100-80gb"), Placement(0, 8)
    eager = student_time(m, 1, 1, 1, 1024, 8, 4, prof, pl)
    device_only = student_time(m, 1, 1, 1, 1024, 8, 4, prof.replace(layer_overhead_s=0.0), pl)
    graphs = student_time(m, 1, 1, 1, 1024, 8, 4, prof, pl, graphed=True)
    assert eager.compute > device_only.compute
    assert graphs.compute == pytest.approx(device_only.compute)
    assert 2 * m.layers * GRAPH_REPLAY_S < device_only.per_microbatch / 10


def test_cli_config_errors_name_the_config_fields(capsys):
    """``kdtrain plan --config``: the run's settings are named by their config fields, the flags by
    their flags; ``--gpus-per-node 0`` is an error, not the profile's node size."""
    config = str(REPO / "configs/distill/tiny.yaml")
    proc = _cli(capsys, "plan", "--config", config, "data.mock=true", "data.seq_length=200", "--world-size", "2")
    assert proc.returncode == 2 and "data.seq_length: 200 exceeds" in proc.stderr, proc.stderr
    proc = _cli(capsys, "plan", "--config", config, "data.mock=true", "split.profile=h1OO", "--world-size", "2")
    assert proc.returncode == 2 and "split.profile: 'h1OO'" in proc.stderr, proc.stderr
    proc = _cli(capsys, "plan", "--config", config, "data.mock=true", "--world-size", "2", "--gpus-per-node", "0")
    assert proc.returncode == 2 and "--gpus-per-node: must be >= 1, got 0" in proc.stderr, proc.stderr
    proc = _cli(capsys, "plan", "--teacher", "tiny", "--student", "tiny", "--seq-len", "32", "--global-batch", "8",
                "--world-size", "2", "--gpus-per-node", "0")
    assert proc.returncode == 2 and "--gpus-per-node: must be >= 1, got 0" in proc.stderr, proc.stderr


def test_colocated_payload_is_priced_as_the_channel_routes_it():
    """Teacher tp2 x dp1 and student tp1 x dp2 on the same 2 ranks: each student replica's rank is
    one of the teacher's last-stage ranks, so the channel moves nothing (zero-copy), as with one
    layout for both roles. The plan charges no payload time, and each rank holds only its own
    replica's payloads (a step's N / 2), not the teacher's N plus N / 2 received ones."""
    tiny = load_model_config("tiny")
    p = make_problem(tiny, tiny, 2, 2, 64, 8, 8, "cpu", micro_batches=(1,))
    nb = payload_nbytes(64, 1, 8)
    same = evaluate_colocated(p, Layout(1, 1, 2), Layout(1, 1, 2), 1, False)
    plan = evaluate_colocated(p, Layout(2, 1, 1), Layout(1, 1, 2), 1, False)
    for pl in (same, plan):
        assert pl.times["payload"] == 0.0
        assert pl.memory["rank"].payload == 4 * nb  # 8 micro-batches per step, 4 per student replica
    # Teacher tp1 x dp2, student tp2 x dp1: rank 1's payloads are sent to rank 0 (which hands its
    # own over in place) and broadcast in the student's TP group.
    moved = evaluate_colocated(p, Layout(1, 1, 2), Layout(2, 1, 1), 1, False)
    assert moved.times["payload"] > 0 and moved.memory["rank"].payload == 8 * nb


def test_colocated_routes_match_the_channel(world_of_one):
    """The planner's colocated traffic (routing.py) is what PayloadChannel.route does for every
    micro-batch, over every pair of layouts of up to 8 ranks and two cycles of the pairing."""
    from collections import Counter

    from conftest import routing_channels
    from kdtrain.planner.routing import colocated_held, colocated_routes

    checked = zero_copies = 0
    for world, t, s, ch in routing_channels(8):
        n = ch.pairing.num_microbatches
        sends, recvs, held, bcast = Counter(), Counter(), Counter(), False
        for o in range(n):
            zero_copy, src, dst = ch.route(o)
            if zero_copy:
                held.update(ch._last_ranks(o)[1])
                zero_copies += 1
                continue
            bcast = bcast or s[0] > 1
            held[dst] += 1
            if src != dst:
                sends[src] += 1
                recvs[dst] += 1
                held[src] += 1
        routes = colocated_routes(t, s, n)
        assert (routes.sends, routes.receives, routes.broadcast) == \
            (max(sends.values(), default=0), max(recvs.values(), default=0), bcast), (t, s)
        assert colocated_held(t, s, n)[0] == held, (t, s)
        # The worst rank of each pair of stages some rank is on.
        by_stages = {}
        for x in range(world):
            key = (x // (t[0] * t[2]), x // (s[0] * s[2]))
            by_stages[key] = max(by_stages.get(key, 0), held[x])
        assert routes.held == by_stages, (t, s)
        checked += 1
    assert checked == 254 and zero_copies > 0


def _check_invariants(p, plan):
    t, s, W = plan.teacher, plan.student, p.world_size
    n_mb = p.global_batch // plan.micro_batch
    assert p.global_batch % plan.micro_batch == 0
    for lay, m, cfg in ((t, p.teacher, p.teacher), (s, p.student, p.student)):
        assert lay.tp * lay.pp * lay.dp == lay.ranks
        assert m.heads % lay.tp == 0 and m.groups % lay.tp == 0 and m.layers % lay.pp == 0
        assert p.gpus_per_node % lay.tp == 0
        assert n_mb % lay.dp == 0
    t_ranks = set(range(t.ranks))
    if plan.split == "colocated":
        assert t.ranks == s.ranks == W
    else:
        s_ranks = set(range(t.ranks, W))
        assert t_ranks.isdisjoint(s_ranks) and t_ranks | s_ranks == set(range(W)) and s_ranks
        assert t.ranks % s.tp == 0  # student TP groups start on a TP boundary
    assert all(mem.total <= p.profile.usable_memory for mem in plan.memory.values())


@pytest.mark.parametrize("teacher,student,W,G,profile", [
    ("llama-3.1-8b", "llama-3.2-1b", 8, 8, "h100-80gb"),
    ("llama-3.1-8b", "llama-3.2-1b", 24, 8, "a100-40gb"),
    ("qwen2.5-7b", "qwen2.5-0.5b", 16, 4, "h200"),
    ("demo-teacher", "demo-student", 6, 2, "cpu"),
])
def test_plan_invariants(teacher, student, W, G, profile):
    p = make_problem(load_model_config(teacher), load_model_config(student), W, G, 256 if profile == "cpu" else 2048,
                     96 if W % 3 == 0 else 64, 32, profile)
    res = search_plans(p)
    assert res.plans, "something fits"
    assert {pl.split for pl in res.plans} == {"colocated", "disaggregated"}
    for plan in res.plans:
        _check_invariants(p, plan)
    rates = [pl.samples_per_s for pl in res.plans]
    assert rates == sorted(rates, reverse=True)
    for plan in res.closest_rejects:
        assert plan.reject and "GiB over" in plan.reject


def test_disaggregated_step_is_the_slower_role():
    p = make_problem(load_model_config("llama-3.1-8b"), load_model_config("llama-3.2-1b"), 16, 8, 2048, 256, 64)
    for plan in search_plans(p, splits=("disaggregated",)).plans[:20]:
        t = plan.times
        assert plan.step_time == pytest.approx(max(t["teacher"] + t["teacher stall"],
                                                   t["student"] + t["first payload"], t["payload link"]))
    for plan in search_plans(p, splits=("colocated",)).plans[:20]:
        t = plan.times
        assert plan.step_time == pytest.approx(t["teacher"] + t["student"] + t["payload"])


def test_reject_names_role_and_gib_over():
    t, s = load_model_config("qwen2.5-7b"), load_model_config("qwen2.5-0.5b")
    p = make_problem(t, s, 1, 8, 4096, 8, 64, "a100-40gb", micro_batches=(8,))
    plan = evaluate_colocated(p, Layout(1, 1, 1), Layout(1, 1, 1), 8, False)
    assert not plan.fits and plan.reject.startswith("colocated rank needs") and "GiB over" in plan.reject
    over = plan.memory["rank"].total - p.profile.usable_memory
    assert f"{over / GiB:.1f} GiB over" in plan.reject
    with pytest.raises(ValueError, match="GiB over"):
        auto_plan(t, s, world_size=1, gpus_per_node=8, seq_len=4096, global_batch=8, micro_batch=8, topk=64,
                  profile="a100-40gb")


def test_auto_plan_interface():
    t, s = load_model_config("llama-3.1-8b"), load_model_config("llama-3.2-1b")
    best, runner = auto_plan(t, s, world_size=64, gpus_per_node=8, seq_len=4096, global_batch=1024, topk=64,
                             profile=get_profile("h100"))
    assert best.mode in ("colocated", "disaggregated") and runner.mode != best.mode
    assert best.samples_per_s >= runner.samples_per_s > 0
    for plan in (best, runner):
        assert plan.teacher_tp * plan.teacher_pp * plan.teacher_dp == plan.teacher_ranks
        assert plan.student_tp * plan.student_pp * plan.student_dp == plan.student_ranks
        if plan.mode == "colocated":
            assert plan.teacher_ranks == plan.student_ranks == 64 and plan.student_offset == 0
        else:
            assert plan.teacher_offset == 0 and plan.student_offset == plan.teacher_ranks
            assert plan.teacher_ranks + plan.student_ranks == 64
        assert plan.micro_batch >= 1 and plan.bottleneck and plan.peak_memory()
        assert "samples/s" in plan.describe() and "\n" not in plan.describe()
        over = plan.config_overrides()
        assert over["split.mode"] == plan.mode and over["student.dp"] == plan.student_dp
    # A fixed micro-batch and optimizer setting are respected; the profile defaults to h100-80gb.
    fixed, _ = auto_plan(t, s, 64, 8, 4096, 1024, 2, 64, distributed_optimizer=False)
    assert fixed.micro_batch == 2 and not fixed.distributed_optimizer
    with pytest.raises(ValueError, match="--topk"):
        auto_plan(load_model_config("tiny"), load_model_config("tiny"), 2, 2, 64, 8, None, 0, "cpu")
    with pytest.raises(ValueError, match="--micro-batch"):
        auto_plan(t, s, 8, 8, 4096, 1024, 3)


def test_closed_form_optimum_balances_the_roles():
    from kdtrain.planner.inflection import disaggregated_optimum

    for a, b, g, sigma, W in ((8.0, 3.0, 0.1, 0.0, 16), (1.0, 5.0, 0.0, 0.3, 64), (2.0, 2.0, 0.5, 0.5, 4),
                              (100.0, 1.0, 2.0, 0.0, 1024)):
        T, wt = disaggregated_optimum(a, b, g, sigma, W)
        assert a / wt + sigma == pytest.approx(T) and b / (W - wt) + g == pytest.approx(T)
        # No real split does better (the two terms cross at the optimum).
        for x in (0.5, 0.9, 1.1, 1.5):
            w = min(max(wt * x, 1e-6), W - 1e-6)
            assert max(a / w + sigma, b / (W - w) + g) >= T - 1e-12
    # No fixed terms: the compute-bound limit (a + b) / W at W_t = W a / (a + b).
    T, wt = disaggregated_optimum(3.0, 1.0, 0.0, 0.0, 8)
    assert T == pytest.approx(0.5) and wt == pytest.approx(6.0)


# Grid for the closed form: pairs x world sizes x link bandwidth factor; both regimes occur.
INFLECTION_GRID = [(t, s, W, bw) for t, s in (("llama-3.1-8b", "llama-3.2-1b"), ("qwen2.5-7b", "qwen2.5-0.5b"),
                                              ("llama-1.2b-32k", "llama-150m-32k"))
                   for W in (8, 64, 512) for bw in (1.0, 0.02)]


def test_inflection_condition_agrees_with_brute_force():
    base = get_profile("h100-80gb")
    outcomes, checked = set(), 0
    for tn, sn, W, bw in INFLECTION_GRID:
        prof = base.replace(inter_node_bw=base.inter_node_bw * bw)
        p = make_problem(load_model_config(tn), load_model_config(sn), W, 8, 2048, 512, 64, prof,
                         micro_batches=(1, 2, 4))
        res = search_plans(p)
        bc, bd = res.best("colocated"), res.best("disaggregated")
        cond = condition(p, bc.step_time)
        brute = bd is not None and bd.step_time < bc.step_time
        outcomes.add(brute)
        if bd is not None and abs(bc.step_time / bd.step_time - 1) < 0.01:
            continue  # a tie within 1%: the search's pruning and the formula's rounding may differ
        checked += 1
        assert cond.disaggregated_wins == brute, (tn, sn, W, bw, cond.summary(), bd.describe() if bd else None)
        if bd is not None:  # the formula's split is never worse than the one the search found
            assert cond.step <= bd.step_time * 1.01, (tn, sn, W, bw, cond.summary(), bd.describe())
    assert outcomes == {True, False}, "the grid must contain both regimes"
    assert checked >= len(INFLECTION_GRID) - 2


def _cli(capsys, *args):
    from kdtrain.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def test_cli_table_json_and_errors(capsys):
    common = ["plan", "--teacher", "llama-3.1-8b", "--student", "llama-3.2-1b", "--world-size", "64",
              "--gpus-per-node", "8", "--seq-len", "4096", "--global-batch", "1024"]
    proc = _cli(capsys, *common, "--top", "4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("#"))
    rows = lines[header + 2: header + 6]
    assert [r.split()[0] for r in rows] == ["1", "2", "3", "4"]
    assert "samples/s" in lines[header] and "bottleneck" in lines[header]
    assert any(ln.startswith("best:") for ln in lines)
    proc = _cli(capsys, *common, "--json", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rates = [pl["samples_per_s"] for pl in out["plans"]]
    assert len(rates) == 5 and rates == sorted(rates, reverse=True)
    assert out["search_s"] < 5.0
    assert {"split", "teacher_ranks", "memory_gib", "bottleneck"} <= set(out["plans"][0])
    proc = _cli(capsys, *common[:-2], "--global-batch", "0")
    assert proc.returncode == 2 and "--global-batch" in proc.stderr
    proc = _cli(capsys, *common, "--profile", "no-such-gpu")
    assert proc.returncode == 2 and "--profile" in proc.stderr


def test_cli_plans_a_run_config_as_split_auto_does(capsys):
    """``kdtrain plan --config`` plans the problem ``split: auto`` plans for the same config and
    overrides (one mapping, planner/from_config.py): the same best plan, micro-batch and on-policy
    steps; the flags that describe the run are refused beside it."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.auto_split import resolve_auto_split

    overrides = ["data.mock=true", "data.path=[]", "onpolicy.fraction=0.5", "onpolicy.prompt_length=8",
                 "training.micro_batch_size=2", "precision.dtype=bf16", "split.profile=a100-80gb",
                 "split.gpus_per_node=4"]
    config = str(REPO / "configs/distill/tiny.yaml")
    proc = _cli(capsys, "plan", "--config", config, *overrides, "--world-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    best = out["plans"][0]
    assert (out["profile"], out["gpus_per_node"]) == ("a100-80gb", 4)  # the config's split.profile and node size
    assert best["micro_batch"] == 2 and best["sample_time_s"] > 0
    cfg = load_distill_config(config, overrides + ["split.mode=auto"])
    resolved, lines = resolve_auto_split(cfg, 4, torch.device("cpu"))
    assert best["describe"] in lines[0]
    assert (resolved.split.mode, resolved.student.dp) == (best["split"], best["student"]["dp"])
    proc = _cli(capsys, "plan", "--config", config, *overrides, "--world-size", "4", "--seq-len", "64")
    assert proc.returncode == 2 and "--seq-len: with --config" in proc.stderr
    proc = _cli(capsys, "plan", "--world-size", "4", "--teacher", "tiny", "--student", "tiny", "--seq-len", "32",
                "--global-batch", "8", "training.seed=1")
    assert proc.returncode == 2 and "training.seed=1: overrides go with --config" in proc.stderr
    proc = _cli(capsys, "plan", "--world-size", "4", "--teacher", "tiny")
    assert proc.returncode == 2 and "--student: required" in proc.stderr


def test_sweep_reports_regime_change_and_writes_png(tmp_path, capsys):
    from kdtrain.cli import main

    png = tmp_path / "sweep.png"
    rc = main(["plan", "--teacher", "llama-3.1-8b", "--student", "llama-3.2-1b", "--world-size", "8",
               "--gpus-per-node", "8", "--seq-len", "4096", "--global-batch", "1024", "--sweep", "world_size",
               "--values", "8,1024", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "regime change: colocated -> disaggregated between world_size=8 and world_size=1024" in out
    # The plan column names its settings beside the layouts, ZeRO-1 included (the best plans use it).
    rows = [line for line in out.splitlines() if line.split()[:1] in (["8"], ["1024"])]
    assert len(rows) == 2 and all(re.search(r" mb=\d+ zero1( recompute)?$", row) for row in rows), rows
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # JSON, several quantities in one figure.
    rc = main(["plan", "--teacher", "demo-teacher", "--student", "demo-student", "--world-size", "4",
               "--gpus-per-node", "2", "--seq-len", "128", "--global-batch", "16", "--profile", "cpu",
               "--sweep", "all", "--json", "--plot", str(tmp_path / "all.png")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
    assert [sw["quantity"] for sw in out["sweeps"]] == ["world_size", "teacher_size", "seq_len", "k", "inter_node_bw"]
    points = [pt for sw in out["sweeps"] for pt in sw["points"]]
    assert {pt["best"] for pt in points} == {"colocated", "disaggregated", None}  # None: no layout uses all ranks
    assert all(pt["closed_form"] == pt["best"] for pt in points)


def test_calibrate_on_cpu_writes_a_loadable_profile(world_of_one, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    proc = _cli(capsys, "calibrate", "--out", str(out), "--model", "tiny", "--seq-len", "32", "--micro-batch", "2",
                "--small-model", "tiny", "--small-seq-len", "8", "--small-micro-batch", "1", "--iters", "2",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    prof = load_profile(out)
    meas = json.loads(out.read_text())["measurements"]
    assert prof.matmul_flops == pytest.approx(meas["matmul_tflops"] * 1e12)
    assert prof.elementwise_bytes == meas["elementwise_bytes"] >= 0 and prof.layer_overhead_s >= 0
    # The fitted profile reproduces the measured steps (unless a fit sits at its bound).
    if 0 < prof.elementwise_bytes < 512 and prof.layer_overhead_s == 0:
        assert meas["predicted_step_time_s"] == pytest.approx(meas["step_time_s"], rel=0.02)
    if 0 < prof.layer_overhead_s < 0.05:
        assert meas["small_predicted_step_time_s"] == pytest.approx(meas["small_step_time_s"], rel=0.02)
    # Decoding: the two host figures reproduce both sampling calls (the small model at its 4
    # layers and cut to one), unless the slope was clamped at 0.
    assert prof.decode_layer_s == meas["decode_layer_s"] >= 0 and prof.decode_token_s == meas["decode_token_s"] >= 0
    assert meas["decode_s"] > 0 and meas["decode_one_layer_s"] > 0
    if prof.decode_layer_s > 0 and prof.decode_token_s > 0:
        assert meas["predicted_decode_s"] == pytest.approx(meas["decode_s"], rel=0.02)
        assert meas["predicted_decode_one_layer_s"] == pytest.approx(meas["decode_one_layer_s"], rel=0.02)
    proc = _cli(capsys, "plan", "--teacher", "demo-teacher", "--student", "demo-student", "--world-size", "4",
                "--seq-len", "256", "--global-batch", "16", "--profile", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["profile"] == prof.name


def test_calibrate_checks_out_before_measuring(tmp_path, capsys, monkeypatch):
    """An --out that cannot be written (below a regular file, or a directory) is an error naming
    it before anything is measured, not a FileExistsError after the measurements."""
    from kdtrain.planner import calibrate

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before --out was checked")

    monkeypatch.setattr(calibrate, "measure_matmul", no_measuring)
    (tmp_path / "afile").write_text("")
    below = f"cannot create its directory, {tmp_path / 'afile'} is not a directory"
    for out, message in ((tmp_path / "afile" / "x.json", below), (tmp_path / "afile" / "sub" / "x.json", below),
                         (tmp_path, "is a directory")):
        proc = _cli(capsys, "calibrate", "--out", str(out), "--model", "tiny", "--device", "cpu")
        assert proc.returncode == 2 and f"error: --out {out}: {message}" in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match=f"cannot write profile {tmp_path / 'afile' / 'x.json'}"):
        save_profile(get_profile("cpu"), tmp_path / "afile" / "x.json")


def test_malformed_profile_files_are_errors_naming_file_and_key(tmp_path, capsys):
    """A profile JSON with a non-numeric value, a top-level list or binary bytes is a ValueError
    naming the file (and the key), from load_profile, ``kdtrain plan --profile`` and a run config's
    ``split.profile``; not a TypeError, AttributeError or a decode error without the file."""
    good = tmp_path / "good.json"
    save_profile(get_profile("cpu"), good)
    raw = json.loads(good.read_text())
    bad = {}
    for name, key, value in (("str", "peak_flops", "fast"), ("null", "memory_bw", None),
                             ("nodes", "gpus_per_node", 2.5)):
        bad[name] = (tmp_path / f"{name}.json", key)
        bad[name][0].write_text(json.dumps({"profile": {**raw["profile"], key: value}}))
    bad["list"] = (tmp_path / "list.json", "JSON object")
    bad["list"][0].write_text("[1]")
    bad["inner"] = (tmp_path / "inner.json", "profile must be a JSON object")
    bad["inner"][0].write_text('{"profile": [1]}')
    bad["binary"] = (tmp_path / "binary.json", "cannot read profile")
    bad["binary"][0].write_bytes(b"\xff\xfe\x00\x81binary")
    for path, key in bad.values():
        with pytest.raises(ValueError) as e:
            load_profile(path, "split.profile")
        assert str(e.value).startswith("split.profile: ") and str(path) in str(e.value) and key in str(e.value)
    with pytest.raises(ValueError, match="profile .*str.json: peak_flops must be a finite number, got 'fast'"):
        load_profile(bad["str"][0])
    common = ["plan", "--teacher", "tiny", "--student", "tiny", "--world-size", "2", "--seq-len", "32",
              "--global-batch", "8"]
    for path, key in (bad["str"], bad["list"], bad["binary"]):
        proc = _cli(capsys, *common, "--profile", str(path))
        assert proc.returncode == 2 and "error: --profile: " in proc.stderr, proc.stderr
        assert str(path) in proc.stderr and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _cli(capsys, "plan", "--config", str(REPO / "configs/distill/tiny.yaml"), "data.mock=true",
                f"split.profile={bad['str'][0]}", "--world-size", "2")
    assert proc.returncode == 2 and f"split.profile: profile {bad['str'][0]}: peak_flops" in proc.stderr, proc.stderr


def test_calibrate_compiled_layers(world_of_one, tmp_path, capsys, monkeypatch):
    """``calibrate --compile`` times the steps with compiled layers (the aot_eager backend here:
    the same capture without code generation) and records it."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("KDTRAIN_COMPILE_BACKEND", "aot_eager")
    counters.clear()
    out = tmp_path / "cpu-compiled.json"
    proc = _cli(capsys, "calibrate", "--out", str(out), "--model", "tiny", "--seq-len", "16", "--micro-batch", "1",
                "--iters", "2", "--device", "cpu", "--compile")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["measurements"]["compiled_layers"] is True
    assert counters["stats"]["unique_graphs"] >= 1
    load_profile(out)


def test_bench_planner_cpu_tiny(world_of_one, tmp_path):
    """The benchmark's one-command path (calibrate, measure, predict, write) in its CPU mode."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_planner", REPO / "benchmarks" / "bench_planner.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "planner_bench.json").read_text())
    (row,) = result["rows"]
    assert row["measured"]["step_s"] > 0 and row["predicted_calibrated"]["step_s"] > 0
    assert row["measured"]["sample_s"] > 0 and row["predicted_sample_s_calibrated"] > 0
    assert load_profile(tmp_path / "profile.json").name == result["profile"]["name"]
    table = (tmp_path / "planner_bench.md").read_text()
    assert [ln for ln in table.splitlines() if ln.startswith("| tiny -> tiny | 32 x 2 x 2 |")]
    assert [ln for ln in table.splitlines() if ln.startswith("| tiny | 4 x 33 |")]


def test_query_key_norm_activation_bytes_are_what_autograd_saves(world_of_one):
    """The planner's activation term for per-head query/key norms equals the bytes autograd
    additionally saves in one layer (saved-tensor hooks, distinct storages, fp32 on CPU)."""
    import dataclasses

    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    groups = build_role_groups(RoleLayout("model", 0, 1, 1, 1))
    saved, planned = {}, {}
    for qk in (False, True):
        cfg = dataclasses.replace(load_model_config("qwen3-0.6b"), num_layers=1, hidden_size=64,
                                  num_attention_heads=4, num_query_groups=2, kv_channels=24, ffn_hidden_size=96,
                                  vocab_size=300, qk_layernorm=qk)
        model = build_gpt(cfg, groups, device=torch.device("cpu"), dtype=F32, seed=0)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(32, 2, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.decoder.layers[0](x, None, rotary_pos_emb=model.rotary_pos_emb(32))
        saved[qk] = sum(n for ptr, n in storages.items() if ptr not in params)
        planned[qk] = layer_activation_bytes(ModelShape.of(cfg), 1, 64, d=4)
    assert saved[True] - saved[False] == planned[True] - planned[False] > 0
