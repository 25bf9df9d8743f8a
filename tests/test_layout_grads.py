"""Two training steps (kdtrain.training.step.train_step) at TP=2, PP=2 and DP=2 give every
parameter the gradient (main_grad, after clipping) and the weights of the single-rank run,
compared per parameter after reassembling the global tensors from the ranks' shards; parts held
more than once (tensor-parallel replicas, data-parallel replicas, the tied output-layer copy at
PP=2) must agree, vocabulary padding rows stay zero, and loss and grad norm match.

tests/test_pretrain.py compares only loss and grad norm of the tiny model (RMSNorm, no biases, no
query/key norms, no loss masks) at rtol 1e-5: tensor ranks that keep their own partial query/key-
norm gradients, or a grad norm that counts a replicated parameter once per tensor rank, move
those figures by 1e-6..6e-5 there and pass. Here two small models carry the parts whose
gradients take special paths: biases, LayerNorm and learned positions (gpt2-style), per-head
query/key norms (qwen3-style), both with tied embeddings and a vocabulary of 300 (padded to 384
at TP=1, 512 at TP=2). The data-parallel replicas get uneven loss masks (sparse, dense), with a
sample and at step 2 a whole micro-batch without a target; clipping scales every gradient.

Tolerance: fp32 on CPU, layouts differ only in the order of reductions. Per parameter, the
largest difference seen is 1.8e-6 of the parameter's largest gradient (norm weights, whose
gradients sum many terms of both signs) and 8e-7 of its largest weight; loss and grad norm
differ by at most 1e-7. RTOL = 1e-5 and SCALAR_RTOL = 2e-6 leave 5x and 20x room; both bugs
above miss them by orders of magnitude. Adam's eps is 1e-3 (the size of the largest clipped
gradient entry), not 1e-8: with 1e-8 the first update is about lr * sign(g), so entries whose
gradient is zero but for rounding (the key biases: softmax ignores them) move by +-lr at random
and the second step's gradients differ by ~1e-5 from layout to layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import replica_microbatches, run_spawn

pytestmark = pytest.mark.slow

RTOL, SCALAR_RTOL = 1e-5, 2e-6
STEPS, GLOBAL_BATCH, MICRO_BATCH, SEQ, CLIP = 2, 8, 2, 16, 0.05
ADAM_EPS = 1e-3
COMMON = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300,
              max_seq_length=64, init_std=0.1, tie_embeddings=True)
FAMILIES = {
    "gpt2": dict(COMMON, num_query_groups=4, normalization="layernorm", activation="gelu_tanh",
                 position_embedding="learned", add_bias_linear=True),
    "qwen3": dict(COMMON, num_query_groups=2, kv_channels=24, qk_layernorm=True),
}
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}


def _sample(j: int) -> np.ndarray:
    return np.random.default_rng(1000 + j).integers(0, COMMON["vocab_size"], SEQ + 1)


def _targets(j: int) -> np.ndarray:
    """The first half of each global batch (replica 0 at DP=2) sparse, the second dense; sample 1
    and, at step 2, the whole first micro-batch without a target."""
    first = j % GLOBAL_BATCH < GLOBAL_BATCH // 2
    t = np.random.default_rng(5000 + j).random(SEQ) < (0.1 if first else 0.95)
    if j % GLOBAL_BATCH == 1 or j in (GLOBAL_BATCH, GLOBAL_BATCH + 1):
        t[:] = False
    return t


def _train(family: str, tp: int, pp: int, dp: int) -> dict:
    """STEPS steps of ``family`` at this layout: per-step (loss, grad norm), and per parameter
    its spec, last gradient (main_grad, clipped) and weights."""
    from kdtrain.config import ModelConfig, OptimizerConfig
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.optimizer import lr_at
    from kdtrain.training.pretrain import LM_REPORT_KEYS, build_trainable, lm_forward_step
    from kdtrain.training.step import train_step

    cfg = ModelConfig(name=family, **FAMILIES[family])
    cfg.check()
    groups = build_role_groups(RoleLayout(family, 0, tp, pp, dp))
    ocfg = OptimizerConfig(lr=3e-3, min_lr=0.0, warmup_steps=0, weight_decay=0.1, clip_grad=CLIP,
                           eps=ADAM_EPS)
    cpu = torch.device("cpu")
    role = build_trainable(cfg, groups, ocfg, SEQ, MICRO_BATCH, cpu, torch.float32, seed=1234)
    forward_step = lm_forward_step(cfg.vocab_size, groups.pgc.tp)
    steps = []
    for step in range(STEPS):
        mbs = replica_microbatches(step, GLOBAL_BATCH, MICRO_BATCH, groups.dp_rank, dp, _sample, _targets, cpu)
        res = train_step(role.schedule, forward_step, mbs, role.grads, role.optimizer, groups,
                         lr_at(step, ocfg, STEPS), CLIP, cfg.tie_embeddings, LM_REPORT_KEYS)
        assert not res.skipped
        steps.append((res.sums["loss_sum"] / res.sums["tokens"], res.grad_norm, res.sums["tokens"]))
    params = [(spec, p.main_grad.clone(), p.detach().clone()) for spec, p in role.params]
    return {"steps": steps, "params": params}


def _layouts_worker(rank, world, out):
    runs = {layout: {family: _train(family, *LAYOUTS[layout]) for family in FAMILIES} for layout in LAYOUTS}
    torch.save(runs, f"{out}/rank{rank}.pt")


def _assemble(runs: list[dict]) -> tuple[dict, dict, dict]:
    """Global gradients and weights from every rank's shards, and per parameter the largest
    difference between parts held more than once (tensor ranks' replicas, data-parallel replicas,
    the tied output-layer copy), relative to the part's largest value. Padding rows of vocabulary
    tables must be zero."""
    full, copies = {"grad": {}, "weight": {}}, {}
    for run in runs:
        for spec, grad, weight in run["params"]:
            for what, local in (("grad", grad), ("weight", weight)):
                g = full[what].setdefault(spec.global_name, torch.full(spec.global_shape, float("nan")))
                covered = torch.zeros(local.shape[spec.dim], dtype=torch.bool)
                for g0, g1, l0 in spec.ranges():
                    part, into = local.narrow(spec.dim, l0, g1 - g0), g.narrow(spec.dim, g0, g1 - g0)
                    placed = ~into.isnan()
                    if placed.any():
                        err = _rel(part[placed], into[placed])
                        key = (what, spec.global_name)
                        copies[key] = max(copies.get(key, 0.0), err)
                    into.copy_(torch.where(placed, into, part))
                    covered[l0:l0 + g1 - g0] = True
                assert not local.movedim(spec.dim, 0)[~covered].any(), \
                    f"{what} of {spec.local_name}: vocabulary padding rows not zero"
    for what, tensors in full.items():
        for name, t in tensors.items():
            assert not t.isnan().any(), f"{what} of {name}: no rank holds some of it"
    return full["grad"], full["weight"], copies


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="module")
def single_rank(world_of_one):
    return {family: _train(family, 1, 1, 1) for family in FAMILIES}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every layout of LAYOUTS in one launch of two ranks: {layout: [rank 0's runs, rank 1's]}."""
    out = tmp_path_factory.mktemp("layout-grads")
    run_spawn(2, _layouts_worker, str(out), tmp_path=out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {layout: [r[layout] for r in ranks] for layout in LAYOUTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_single_rank_gradients_and_weights(single_rank, two_ranks, layout):
    for family, ref in single_rank.items():
        assert all(norm > CLIP for _, norm, _ in ref["steps"])
        runs = [rank[family] for rank in two_ranks[layout]]
        ref_grad, ref_weight, _ = _assemble([ref])
        grad, weight, copies = _assemble(runs)
        assert grad.keys() == ref_grad.keys()
        off = sorted(((_rel(got[name], want[name]), f"{kind} of {name}")
                      for kind, got, want in (("grad", grad, ref_grad), ("weight", weight, ref_weight))
                      for name in want), reverse=True)
        split = sorted(((err, f"{kind} of {name}") for (kind, name), err in copies.items()), reverse=True)
        off, split = [o for o in off if o[0] > RTOL], [c for c in split if c[0] > RTOL]
        assert not off and not split, (
            f"{family} at {layout}, largest difference / largest value (RTOL {RTOL}):\n"
            f"  {len(off)} tensors differ from one rank's:" + "".join(f"\n    {e:.3g} {w}" for e, w in off[:6])
            + f"\n  {len(split)} tensors differ between their copies:"
            + "".join(f"\n    {e:.3g} {w}" for e, w in split[:4])
            + "\n  (loss, grad norm) by step: " + ", ".join(f"({g[0]:.8g}, {g[1]:.8g}) vs ({w[0]:.8g}, {w[1]:.8g})"
                                                         for g, w in zip(runs[0]["steps"], ref["steps"])))
        for run in runs:
            for step, (got, want) in enumerate(zip(run["steps"], ref["steps"]), 1):
                assert got[2] == want[2] and got[:2] == pytest.approx(want[:2], rel=SCALAR_RTOL), \
                    f"{family} at {layout}, step {step}: (loss, grad norm, tokens) {got}, at one rank {want}"
