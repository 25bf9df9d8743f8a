"""Sampling from a GPT (kdtrain/models/generate.py), what on-policy distillation trains on.

The key/value-cached decode must produce the tokens a full re-forward of the prefix produces
(Llama-style GQA, Qwen3 query/key norms, GPT-2 learned positions); greedy sampling must follow the
teacher-forced argmax; a sample's tokens depend on its id, not on the micro-batch it is in. The
tensor-parallel case (vocab-sliced noise, all-gathered maximum) is the on-policy layout test in
tests/test_distill.py.
"""

from __future__ import annotations

import pytest
import torch

from kdtrain.config import ModelConfig
from kdtrain.config.distill import load_distill_config

V, P, T = 211, 5, 20


def _model(kind: str):
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    common = dict(name=kind, num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=V,
                  max_seq_length=64, init_std=0.1)
    cfg = {"llama": ModelConfig(**common, num_query_groups=2),
           "qwen3": ModelConfig(**common, num_query_groups=2, kv_channels=24, qk_layernorm=True, tie_embeddings=True),
           "gpt2": ModelConfig(**common, normalization="layernorm", activation="gelu_tanh",
                               position_embedding="learned", add_bias_linear=True, tie_embeddings=True)}[kind]
    cfg.check()
    return build_gpt(cfg, build_role_groups(RoleLayout("m", 0, 1, 1, 1)), device=torch.device("cpu"),
                     dtype=torch.float32, seed=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_cached_decode_equals_full_reforward(kind, world_of_one):
    from kdtrain.models.generate import sample

    model = _model(kind)
    assert all(layer.direct for layer in model.decoder.layers)
    prompts = torch.randint(0, V, (3, P), generator=torch.Generator().manual_seed(1))
    kw = dict(vocab_size=V, seed=7, sample_ids=[10, 11, 12])
    cached = sample(model, prompts, T, temperature=1.0, **kw)
    for layer in model.decoder.layers:  # the fallback: the whole prefix again for every token
        layer._direct = False
    try:
        recomputed = sample(model, prompts, T, temperature=1.0, **kw)
    finally:
        for layer in model.decoder.layers:
            layer._direct = True
    assert torch.equal(cached, recomputed) and torch.equal(cached[:, :P], prompts)
    assert int(cached.max()) < V
    greedy = sample(model, prompts, T, temperature=0.0, **kw)
    pos = torch.arange(T - 1).unsqueeze(0).expand(3, T - 1)
    with torch.no_grad():
        forced = model(greedy[:, :-1], pos, None)[..., :V].argmax(-1).t()  # [b, T-1]
    assert torch.equal(forced[:, P - 1:], greedy[:, P:])
    assert not torch.equal(greedy, cached)  # temperature 1 samples, not the argmax


def test_a_sample_depends_on_its_id_not_its_batch(world_of_one):
    from kdtrain.models.generate import sample

    model = _model("llama")
    prompts = torch.randint(0, V, (3, P), generator=torch.Generator().manual_seed(2))
    together = sample(model, prompts, T, vocab_size=V, temperature=0.8, seed=3, sample_ids=[4, 5, 6])
    alone = sample(model, prompts[1:2], T, vocab_size=V, temperature=0.8, seed=3, sample_ids=[5])
    assert torch.equal(together[1:2], alone)
    other_seed = sample(model, prompts, T, vocab_size=V, temperature=0.8, seed=4, sample_ids=[4, 5, 6])
    assert not torch.equal(together, other_seed)
    assert model.training  # restored after sampling


@pytest.mark.parametrize("override,field", [
    (["student.pp=2"], "student.pp"),
    (["onpolicy.prompt_length=40"], "onpolicy.prompt_length"),
    (["teacher.source=cache", "teacher.cache=/nowhere"], "teacher.source"),
    (["onpolicy.temperature=-1"], "onpolicy.temperature"),
    (["onpolicy.stop_token=-2"], "onpolicy.stop_token"),
    (["onpolicy.stop_token=512"], "onpolicy.stop_token"),  # the tiny vocabulary has 512 ids
])
def test_onpolicy_config_errors_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg = load_distill_config("tiny", ["data.mock=true", "onpolicy.fraction=0.5", "onpolicy.prompt_length=8",
                                           *override])
        cfg.validate(2)


def test_picked_tokens_follow_the_softmax():
    """Inversion with the hashed uniforms draws from softmax(logits / T) over the real ids: the
    frequencies of 20000 draws match the probabilities, padded ids (here with the largest logits)
    never come out, and temperature 0 is the argmax."""
    from kdtrain.models.generate import pick_tokens, uniforms

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 3.0, 9.0, 9.0])  # ids 6, 7: padding (vocab 6)
    n, temperature = 20000, 1.5
    u = torch.from_numpy(uniforms(11, list(range(n)), 0, 1)[:, 0])
    picked = pick_tokens(logits.expand(n, -1), 6, temperature, u, None)
    freq = torch.bincount(picked, minlength=8).double() / n
    probs = torch.softmax(logits[:6].double() / temperature, dim=0)
    assert freq[6:].sum() == 0
    assert (freq[:6] - probs).abs().max() < 0.01, (freq, probs)
    assert torch.equal(pick_tokens(logits.expand(3, -1), 6, 0.0, None, None), torch.full((3,), 5))
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_replies_keep_their_prompts_and_stop_at_the_stop_token(world_of_one):
    """sample_replies: each row samples from its own start (the rows before it are fed their own
    tokens), as ``sample`` does with that row's prompt alone, until the stop token (included);
    the tokens after it, and every token of a row whose start is past the end, keep their values."""
    from kdtrain.models.generate import sample, sample_replies

    model = _model("llama")
    windows = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(4))
    starts, ids, kw = [5, 9, T + 3], [7, 8, 9], dict(vocab_size=V, temperature=1.0, seed=2)
    free = [sample(model, windows[i:i + 1, :starts[i]], T, sample_ids=[ids[i]], **kw)[0] for i in range(2)]
    stop = int(free[0][starts[0] + 3])  # row 0 samples it within four tokens
    got, ends = sample_replies(model, windows, starts, sample_ids=ids, stop_token=stop, **kw)
    for i in range(2):
        sampled = free[i][starts[i]:]
        hits = (sampled == stop).nonzero()
        end = starts[i] + int(hits[0]) + 1 if len(hits) else T
        assert ends[i] == end and end <= (starts[0] + 4 if i == 0 else T)
        assert torch.equal(got[i, :starts[i]], windows[i, :starts[i]])
        assert torch.equal(got[i, starts[i]:end], free[i][starts[i]:end])
        assert torch.equal(got[i, end:], windows[i, end:])
    assert ends[2] == T and torch.equal(got[2], windows[2])
    # Without a stop token every row samples to the end, as ``sample`` does.
    got, ends = sample_replies(model, windows, starts, sample_ids=ids, **kw)
    assert ends == [T, T, T] and all(torch.equal(got[i], free[i]) for i in range(2))
