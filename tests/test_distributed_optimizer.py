"""The distributed optimizer (``optimizer.distributed``) trains like the unsharded one, and each
data-parallel replica holds an equal share of the optimizer state whatever the parameter sizes.

Each replica owns one equal chunk of the flat parameter order, cut inside parameters where it
falls (optimizer.py): a model whose word embedding is most of its parameters is the case that
whole-parameter ownership got wrong (the embedding's owner held ~3x the mean state here, up to
~15x at real sizes). Three layouts on four ranks, each run twice from the same init, sharded and
unsharded, over the same uneven batches: DP=4 (a chunk size the parameter count does not
divide), PP=2 x DP=2 with tied embeddings (the two stages' copies are summed before the
reduce-scatter) and TP=2 x DP=2 with per-head query/key norms (their tensor-parallel sum).

Tolerance: fp32 on CPU; the two runs differ only in the order of the data-parallel sums and of
the gradient norm's partial sums (the norm scales the clipped gradients). As in
tests/test_layout_grads.py, Adam's eps is 1e-3 so that entries whose gradient is zero but for
rounding do not move by +-lr at random; weights then agree to RTOL of each parameter's largest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import replica_microbatches, run_spawn

pytestmark = pytest.mark.slow

RTOL, SCALAR_RTOL = 1e-5, 2e-6
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ, CLIP = 3, 8, 2, 16, 0.05
COMMON = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, vocab_size=3001,
              max_seq_length=32, init_std=0.1)
FAMILIES = {
    "gpt2": dict(COMMON, num_query_groups=4, normalization="layernorm", activation="gelu_tanh",
                 position_embedding="learned", add_bias_linear=True, tie_embeddings=True),
    "qwen3": dict(COMMON, num_query_groups=2, kv_channels=12, qk_layernorm=True, tie_embeddings=False),
}
LAYOUTS = {"dp4": (1, 1, 4, "gpt2"), "pp2-dp2": (1, 2, 2, "gpt2"), "tp2-dp2": (2, 1, 2, "qwen3")}


def _sample(j: int) -> np.ndarray:
    return np.random.default_rng(1000 + j).integers(0, COMMON["vocab_size"], SEQ + 1)


def _targets(j: int) -> np.ndarray:
    return np.random.default_rng(5000 + j).random(SEQ) < (0.2 if j % 3 else 0.9)  # uneven token counts


def _build(family: str, tp: int, pp: int, dp: int, distributed: bool, seed: int = 1234):
    from kdtrain.config import ModelConfig, OptimizerConfig
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.pretrain import build_trainable

    cfg = ModelConfig(name=family, **FAMILIES[family])
    cfg.check()
    groups = build_role_groups(RoleLayout(family, 0, tp, pp, dp))
    ocfg = OptimizerConfig(lr=3e-3, weight_decay=0.1, clip_grad=CLIP, eps=1e-3, distributed=distributed)
    role = build_trainable(cfg, groups, ocfg, SEQ, MICRO_BATCH, torch.device("cpu"), torch.float32, seed=seed)
    return cfg, groups, role


def _train(family: str, tp: int, pp: int, dp: int, distributed: bool):
    from kdtrain.training.pretrain import LM_REPORT_KEYS, lm_forward_step
    from kdtrain.training.step import train_step

    cfg, groups, role = _build(family, tp, pp, dp, distributed)
    cpu = torch.device("cpu")
    forward_step = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    steps = []
    for step in range(STEPS):
        mbs = replica_microbatches(step, GLOBAL_BATCH, MICRO_BATCH, groups.dp_rank, dp, _sample, _targets, cpu)
        res = train_step(role.schedule, forward_step, mbs, role.grads, role.optimizer, groups, 3e-3, CLIP,
                         cfg.tie_embeddings, LM_REPORT_KEYS)
        assert not res.skipped and res.grad_norm > CLIP  # clipping scales every step
        steps.append((res.sums["loss_sum"] / res.sums["tokens"], res.grad_norm))
    return cfg, groups, role, steps


def _check_layout(name: str):
    """(model config, groups, sharded run) of layout ``name``, after checking it against the
    unsharded run."""
    import torch.distributed as dist

    from kdtrain.training.optimizer import assign_owners

    tp, pp, dp, family = LAYOUTS[name]
    _, _, ref, ref_steps = _train(family, tp, pp, dp, distributed=False)
    cfg, groups, role, steps = _train(family, tp, pp, dp, distributed=True)
    assert role.optimizer.sharded and not ref.optimizer.sharded

    # The same curve and weights as the unsharded optimizer.
    for step, (got, want) in enumerate(zip(steps, ref_steps), 1):
        assert got == pytest.approx(want, rel=SCALAR_RTOL), f"{name} step {step}: (loss, norm) {got} vs {want}"
    for (spec, p), (_, q) in zip(role.params, ref.params):
        err = float((p - q).abs().max() / q.abs().max())
        assert err <= RTOL, f"{name}: {spec.global_name} differs by {err:.3g} of its largest weight"

    # Every replica holds the same weights, bit for bit (each got the owners' values).
    flat = torch.cat([p.detach().reshape(-1) for _, p in role.params])
    copies = [torch.empty_like(flat) for _ in range(dp)]
    dist.all_gather(copies, flat, group=groups.pgc.dp)
    assert all(torch.equal(c, flat) for c in copies), f"{name}: replicas' weights differ"

    # This replica's optimizer state: its chunk, ceil(P / dp) elements or fewer, also where one
    # parameter outweighs a replica's share (the embedding; whole-parameter owners were uneven).
    sizes = [p.numel() for _, p in role.params]
    held = sum(s.stop - s.start for s in role.optimizer.owned)
    share = -(-sum(sizes) // dp)
    assert held <= share and held == role.grads.shard_range[1] - role.grads.shard_range[0]
    moments = sum(st["exp_avg"].numel() for st in role.optimizer.opt.state.values())
    assert moments == held
    if name == "dp4":
        whole = max(np.bincount(assign_owners(sizes, dp), weights=sizes))
        assert whole > 2.5 * share, (whole, share)  # the model this test needs
    # Together the replicas hold each element once.
    counts = torch.tensor([held], dtype=torch.long)
    dist.all_reduce(counts, group=groups.pgc.dp)
    assert int(counts) == sum(sizes)
    return cfg, groups, role


def _whole_state(role, group) -> dict:
    """A sharded run's fp32 master and Adam moments of every parameter, gathered from the
    replicas' chunks (tp = pp = 1: local shapes are global): {global name: {key: tensor}}."""
    import torch.distributed as dist

    g, opt = role.grads, role.optimizer
    out: dict = {}
    for key in ("master", "exp_avg", "exp_avg_sq"):
        mine = torch.zeros(g.chunk)
        parts = [(s.master if key == "master" else opt.opt.state[s.master][key]).reshape(-1) for s in opt.owned]
        if parts:  # the shares are in flat order and cover this rank's chunk
            flat = torch.cat(parts)
            mine[:flat.numel()] = flat
        full = torch.empty(g.chunk * dist.get_world_size(group))
        dist.all_gather_into_tensor(full, mine, group=group)
        for (spec, p), off in zip(g.params, g.offsets):
            out.setdefault(spec.global_name, {})[key] = full[off: off + p.numel()].view(p.shape)
    return out


def _resume_elsewhere(cfg, groups, role, tmp: str) -> None:
    """The sharded DP=4 run's checkpoint (chunks of the whole model, cut at quarters of it) resumed
    at PP=2 x DP=2 (chunks of each stage, cut at halves of it; the last stage's tied output copy
    read from the embedding's pieces): every parameter and every share of master weight and Adam
    moments is the DP=4 run's, bit for bit."""
    import torch.distributed as dist

    from kdtrain.config import CheckpointConfig
    from kdtrain.training.pretrain import restore_role, save_role

    run = {"kind": "pretrain", "global_batch_size": GLOBAL_BATCH, "data": {}}
    ck = CheckpointConfig(dir=f"{tmp}/ck", keep=1)
    save_role(ck, cfg, role, STEPS, run)
    want = _whole_state(role, groups.pgc.dp)
    for spec, p in role.params:
        assert torch.equal(p, want[spec.global_name]["master"])  # fp32: the weights are the masters
    _, _, other = _build(cfg.name, 1, 2, 2, distributed=True, seed=99)
    assert restore_role(ck, cfg, other, dist.get_rank(), run).step == STEPS
    for spec, p in other.params:
        assert torch.equal(p, want[spec.global_name]["master"]), spec.local_name
    assert any(not s.whole for s in other.optimizer.owned)
    for s in other.optimizer.owned:
        st = dict(other.optimizer.opt.state[s.master], master=s.master)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], want[s.spec.global_name][k].reshape(-1)[s.start:s.stop]), (k, s.spec.local_name)
        assert st["step"] == STEPS


def _worker(rank, world, tmp):
    runs = {name: _check_layout(name) for name in LAYOUTS}
    cfg, groups, role = runs["dp4"]
    _resume_elsewhere(cfg, groups, role, tmp)


def test_sharded_optimizer_trains_like_the_unsharded_one_on_equal_shares(tmp_path):
    """Also: its checkpoint resumes under another layout and other chunks (``_resume_elsewhere``)."""
    run_spawn(4, _worker, str(tmp_path), tmp_path=tmp_path)
