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

from conftest import small_gpt
from kdtrain.config.distill import load_distill_config

V, P, T = 211, 5, 20


def _model(kind: str):
    return small_gpt(kind, V)


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
    rows = []  # ... but logits of its last position only
    hook = model.output_layer.register_forward_hook(lambda m, args, out: rows.append(out[0].shape[0]))
    try:
        recomputed = sample(model, prompts, T, temperature=1.0, **kw)
    finally:
        hook.remove()
        for layer in model.decoder.layers:
            layer._direct = True
    assert torch.equal(cached, recomputed) and torch.equal(cached[:, :P], prompts)
    assert rows == [3] * (T - P), rows
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
    (["onpolicy.prompt_length=40"], "onpolicy.prompt_length"),
    (["teacher.source=cache", "teacher.cache=/nowhere"], "teacher.source"),
    (["onpolicy.temperature=-1"], "onpolicy.temperature"),
    (["onpolicy.stop_token=-2"], "onpolicy.stop_token"),
    (["onpolicy.stop_token=512"], "onpolicy.stop_token"),  # the tiny vocabulary has 512 ids
    (["onpolicy.top_k=-1"], "onpolicy.top_k"),
    (["onpolicy.top_p=0"], "onpolicy.top_p"),
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


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.8), (4, 0.7), (1, 1.0)])
def test_top_k_and_top_p_draw_from_the_renormalised_head(top_k, top_p):
    """top_k keeps the k most likely ids, top_p then the smallest prefix of them (by probability)
    holding top_p of their mass; the draws follow the renormalised softmax over what is kept."""
    from kdtrain.models.generate import pick_tokens, uniforms

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 3.0, 9.0, 9.0])  # ids 6, 7: padding (vocab 6)
    n, temperature = 40000, 1.5
    u = torch.from_numpy(uniforms(11, list(range(n)), 0, 1)[:, 0])
    picked = pick_tokens(logits.expand(n, -1), 6, temperature, u, None, top_k, top_p)
    freq = torch.bincount(picked, minlength=8).double() / n
    z = logits[:6].double() / temperature
    keep = z.argsort(descending=True)[:top_k or 6]
    probs = torch.softmax(z[keep], dim=0)
    keep = keep[(probs.cumsum(0) - probs) < top_p]
    want = torch.zeros(8, dtype=torch.float64)
    want[keep] = torch.softmax(z[keep], dim=0)
    assert (freq - want).abs().max() < 0.01, (freq, want)
    assert set(picked.unique().tolist()) == set(keep.tolist())


def test_ties_at_the_top_k_cut_go_to_the_lower_ids():
    """Three ids share the largest logit and top_k=2 keeps two: the lower ids, whatever order
    topk happens to return them in."""
    from kdtrain.models.generate import pick_tokens, uniforms

    n = 4000
    u = torch.from_numpy(uniforms(1, list(range(n)), 0, 1)[:, 0])
    for logits in (torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0, 2.0])):
        picked = pick_tokens(logits.expand(n, -1), 6, 1.0, u, None, 2, 1.0)
        tied = (logits == 3.0).nonzero()[:, 0].tolist()
        assert set(picked.tolist()) == set(tied[:2]), (logits, picked.unique())


def test_top_p_takes_the_nucleus_of_the_whole_vocabulary():
    """top_p without top_k over a flat distribution of 8192 ids: the nucleus holds thousands of
    ids, far more than the first candidate pool (FILTER_POOL); every draw lies in it and draws
    reach past the pool (it was taken among the pool's 1024 ids, against the pool's own mass)."""
    from kdtrain.models.generate import FILTER_POOL, pick_tokens, uniforms

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8192, generator=g) * 0.5
    z = logits.double()
    probs = torch.softmax(z, 0)
    order = probs.argsort(descending=True)
    sorted_p = probs[order]
    nucleus = order[(sorted_p.cumsum(0) - sorted_p) < 0.9]
    assert len(nucleus) > 4 * FILTER_POOL
    n = 2000  # the share past the pool: 0.73 (binomial sd 0.01)
    u = torch.from_numpy(uniforms(5, list(range(n)), 0, 1)[:, 0])
    picked = torch.cat([pick_tokens(logits.expand(1000, -1), 8192, 1.0, u[i:i + 1000], None, 0, 0.9)
                        for i in range(0, n, 1000)])
    rank = torch.empty(8192, dtype=torch.long)
    rank[order] = torch.arange(8192)
    assert set(picked.tolist()) <= set(nucleus.tolist())
    assert (rank[picked] >= FILTER_POOL).float().mean() > 0.5  # most of the nucleus' mass lies past the pool


def _tp_pick(rank, world, logits, u, top_k, top_p, out):
    from kdtrain.models.generate import pick_tokens

    group = torch.distributed.new_group([0, 1])
    width = logits.shape[1] // world
    got = pick_tokens(logits[:, rank * width:(rank + 1) * width], 300, 0.9, u, group, top_k, top_p)
    torch.save(got, f"{out}.{rank}")


@pytest.mark.parametrize("top_k,top_p,ties", [(0, 1.0, False), (20, 1.0, False), (0, 0.9, False), (50, 0.5, False),
                                              (20, 1.0, True), (0, 0.9, True)])
def test_filtered_draws_do_not_depend_on_tensor_parallelism(tmp_path, top_k, top_p, ties):
    """Two tensor ranks, each with half of the vocabulary (the last ids padding), pick exactly the
    tokens one rank picks from the whole row; also with many tied logits (as bf16 gives)."""
    from conftest import run_spawn
    from kdtrain.models.generate import pick_tokens, uniforms

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 320, generator=g) * 3
    if ties:
        logits = logits.round()
    u = torch.from_numpy(uniforms(3, list(range(64)), 0, 1)[:, 0])
    want = pick_tokens(logits, 300, 0.9, u, None, top_k, top_p)
    run_spawn(2, _tp_pick, logits, u, top_k, top_p, str(tmp_path / "picked"), tmp_path=tmp_path)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"picked.{rank}"), want), rank


def _check_rewritten(model, windows, spans, got, flags, ids, stop, **kw):
    """Every sampled run of a row equals sampling freely from exactly the tokens before it (ending
    at the first stop token), and the other positions are the row's given tokens outside its
    replies, in order, then padding (0)."""
    from kdtrain.models.generate import sample

    T = windows.shape[1]
    for i in range(windows.shape[0]):
        f = flags[i].tolist()
        runs, q = [], None
        for t, on in enumerate(f + [False]):
            if on and q is None:
                q = t
            elif not on and q is not None:
                runs.append((q, t))
                q = None
        assert len(runs) <= len(spans[i])
        for q, r in runs:
            free = sample(model, got[i:i + 1, :q], T, sample_ids=[ids[i]], **kw)[0]
            assert torch.equal(got[i, q:r], free[q:r]), (i, q, r)
            if r < T:  # it stopped
                assert int(got[i, r - 1]) == stop and stop not in free[q:r - 1].tolist()
        keep, at = [], 0
        for s0, e0 in spans[i][:len(runs)]:
            keep += windows[i, at:s0].tolist()
            # The data resumes after the data reply's own last stop token (or at the span's end).
            inside = (windows[i, s0:e0] == stop).nonzero()[:, 0].tolist() if stop is not None else []
            at = s0 + inside[-1] + 1 if inside else e0
        keep += windows[i, at:].tolist()
        rest = got[i][~flags[i]].tolist()
        assert rest == (keep + [0] * T)[:len(rest)], i


def test_replies_are_sampled_in_place_and_the_data_resumes_after_them(world_of_one):
    """sample_replies: each row samples where its replies start (rows not sampling are fed their
    own tokens), stops at the stop token, and the row's given tokens resume from the end of the
    reply it replaced; each sampled run is what ``sample`` draws from the same prefix alone."""
    from kdtrain.models.generate import sample, sample_replies

    model = _model("llama")
    windows = torch.randint(1, V, (4, T), generator=torch.Generator().manual_seed(4))
    ids, kw = [7, 8, 9, 10], dict(vocab_size=V, temperature=1.0, seed=2)
    spans = [[(5, 9)], [(3, 6), (9, 12), (14, 18)], [(9, T)], []]
    stop = int(sample(model, windows[:1, :5], T, sample_ids=[7], **kw)[0, 7])  # row 0 stops within 3 tokens
    got, flags, _ = sample_replies(model, windows, spans, sample_ids=ids, stop_token=stop, **kw)
    assert flags[0, 5] and not flags[0, :5].any() and flags[0].sum() <= 3 and not flags[3].any()
    assert torch.equal(got[3], windows[3])
    _check_rewritten(model, windows, spans, got, flags, ids, stop, **kw)
    # Without a stop token each row samples from its first reply to the end, as ``sample`` does.
    got, flags, _ = sample_replies(model, windows, spans, sample_ids=ids, **kw)
    for i, row in enumerate(spans[:3]):
        assert flags[i].tolist() == [t >= row[0][0] for t in range(T)]
        assert torch.equal(got[i], sample(model, windows[i:i + 1, :row[0][0]], T, sample_ids=[ids[i]], **kw)[0])


def test_the_template_s_text_after_a_reply_s_end_token_is_kept(world_of_one, monkeypatch):
    """ChatML puts a newline after each <|im_end|>, inside the data's reply span: a student that
    writes the data's reply and stops must get the newline back before the next turn (the data
    resumed at the span's end, after it)."""
    import kdtrain.models.generate as generate

    model = _model("llama")
    stop, newline = 5, 6
    #            user turn       | reply (span 4..9: "11 12 13 <stop> <newline>") | next user turn
    row = torch.tensor([[1, 2, 3, 4, 11, 12, 13, stop, newline, 21, 22, 23, stop, newline, 1, 2]])
    reply = iter([11, 12, 13, stop])
    monkeypatch.setattr(generate, "pick_tokens", lambda *a, **k: torch.tensor([next(reply, 0)]))
    got, flags, _ = generate.sample_replies(model, row, [[(4, 9)]], vocab_size=V, temperature=0.0, seed=0,
                                            sample_ids=[0], stop_token=stop)
    assert torch.equal(got, row) and flags[0].tolist() == [4 <= t < 8 for t in range(16)]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_replies_within_documents_are_sampled_as_if_alone(kind, world_of_one):
    """With document positions (data.attention: documents) a reply is what sampling writes from
    its own document alone; the returned positions restart where the data's next document starts
    in the rewritten row; and the training forward on the rewritten row with those positions
    (DocumentMask) picks the same greedy tokens, so the cached decoder attends as training does."""
    import numpy as np

    from kdtrain.data.gpt_dataset import positions_from_starts
    from kdtrain.models.documents import DocumentMask
    from kdtrain.models.generate import sample, sample_replies

    model = _model(kind)
    windows = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(5))
    starts = [6, 9]  # row 0: documents [0, 6) and [6, T), its reply in the second; row 1: [0, 9), [9, T)
    positions = torch.tensor(np.stack([positions_from_starts(T, np.array([s])) for s in starts]))
    spans = [[(10, 14)], [(4, 7)]]
    kw = dict(vocab_size=V, temperature=0.0, seed=0)
    stop = int(sample(model, windows[1:2, :4], T, sample_ids=[1], **kw)[0, 5])  # row 1 stops within 2 tokens
    got, flags, pos = sample_replies(model, windows, spans, sample_ids=[0, 1], stop_token=stop, positions=positions,
                                     **kw)
    # Row 0 writes from its document alone: the same tokens as sampling from [6, 10) by itself.
    n0 = int(flags[0].sum())
    alone = sample(model, windows[0:1, 6:10], T - 6, sample_ids=[0], **kw)[0]
    assert n0 > 0 and torch.equal(got[0, 10:10 + n0], alone[4:4 + n0])
    assert pos[0].tolist() == positions_from_starts(T, np.array([6])).tolist()  # one document continues
    # Row 1 stopped; the data resumed at 7 and its second document (data position 9) starts at 4 + n1 + 2.
    n1 = int(flags[1].sum())
    assert 1 <= n1 <= 2 and int(got[1, 4 + n1 - 1]) == stop
    assert torch.equal(got[1, 4 + n1:4 + n1 + T - 7], windows[1, 7:])  # then padding
    assert pos[1].tolist() == positions_from_starts(T, np.array([4 + n1 + 2])).tolist()
    with torch.no_grad():
        logits = model(got[:, :-1], pos[:, :-1], DocumentMask(pos[:, :-1].contiguous()))[..., :V]
    forced = logits.argmax(-1).t()  # [b, T - 1]: the greedy next token of every position
    for i in range(2):
        t = torch.nonzero(flags[i])[:, 0]
        assert torch.equal(forced[i, t - 1], got[i, t]), i


def _stage_case():
    """Rows, spans, positions and settings of the pipeline test: a stop token, attention within
    documents and a temperature draw."""
    import numpy as np

    from kdtrain.data.gpt_dataset import positions_from_starts

    windows = torch.randint(1, V, (3, T), generator=torch.Generator().manual_seed(8))
    spans = [[(5, 9)], [(3, 6), (11, 14)], [(8, T)]]
    positions = torch.tensor(np.stack([positions_from_starts(T, np.array(s)) for s in ([10], [], [4, 12])]))
    kw = dict(vocab_size=V, temperature=1.0, seed=5, sample_ids=[3, 4, 5], stop_token=int(windows[0, 2]),
              top_p=0.9)
    return windows, spans, positions, kw


def _sample_on_stages(rank, world, out):
    from kdtrain.models.generate import DecodeStages, sample_replies
    from kdtrain.parallel import RoleLayout, build_role_groups

    model = small_gpt("llama", V, pp=world)
    groups = build_role_groups(RoleLayout("m", 0, 1, world, 1))
    windows, spans, positions, kw = _stage_case()
    got = sample_replies(model, windows, spans, positions=positions, stages=DecodeStages.of(groups), **kw)
    torch.save(got, f"{out}.{rank}")


def test_pipeline_stages_sample_what_the_whole_model_samples(world_of_one, tmp_path):
    """A model split in two pipeline stages decodes through them (hidden states forward, the last
    stage's picks broadcast back): every stage returns the rows, flags and positions the whole
    model returns."""
    from conftest import run_spawn
    from kdtrain.models.generate import sample_replies

    windows, spans, positions, kw = _stage_case()
    want = sample_replies(_model("llama"), windows, spans, positions=positions, **kw)
    assert want[1].any() and not want[1].all()
    run_spawn(2, _sample_on_stages, str(tmp_path / "rows"), tmp_path=tmp_path)
    for rank in range(2):
        got = torch.load(tmp_path / f"rows.{rank}")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), rank


def test_given_stretches_go_through_the_model_in_one_forward(world_of_one, monkeypatch):
    """Where no row samples for a while (between one reply's stop and the next reply's start),
    the given tokens go through the model in one forward instead of one each, and the rows are
    those the whole-prefix decoder (no key/value cache, one position at a time) writes."""
    import kdtrain.models.generate as generate

    model = small_gpt("llama", V, num_layers=2)
    L = 60
    windows = torch.randint(1, V, (2, L), generator=torch.Generator().manual_seed(9))
    spans = [[(4, 8), (45, 50)], [(6, 9), (40, 44)]]
    kw = dict(vocab_size=V, temperature=1.0, seed=1, sample_ids=[0, 1])
    stop = int(generate.sample_replies(model, windows, [[(4, 8)], [(6, 9)]], **kw)[0][0, 5])  # an early stop
    sizes = []
    forward = generate._forward_positions
    monkeypatch.setattr(generate, "_forward_positions",
                        lambda m, tokens, *a, **k: (sizes.append(tokens.shape[1]), forward(m, tokens, *a, **k))[1])
    got, flags, _ = generate.sample_replies(model, windows, spans, stop_token=stop, **kw)
    assert max(sizes[1:]) > 1 and len(sizes) < L - 4, sizes  # a stretch went in one forward
    for layer in model.decoder.layers:
        layer._direct = False
    try:
        want, want_flags, _ = generate.sample_replies(model, windows, spans, stop_token=stop, **kw)
    finally:
        for layer in model.decoder.layers:
            layer._direct = True
    assert torch.equal(got, want) and torch.equal(flags, want_flags)
    assert flags[:, 40:].any()  # the second replies were sampled after the stretch


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_fixed_shape_decode_step_samples_what_the_decoder_samples(kind, world_of_one, monkeypatch):
    """``graphs=True`` (decode_graph.py; eager on CPU, the code a CUDA graph records): every
    single-position forward runs with fixed shapes (device slot, attention over the whole zeroed
    cache under a mask) and the rows, flags and document positions equal the ordinary cached
    decoder's, over a window and within documents, with a stop token, given stretches and a nucleus
    draw; each position's logits agree to fp32 rounding."""
    import numpy as np

    import kdtrain.models.decode_graph as decode_graph
    from kdtrain.models.generate import sample_replies

    model = _model(kind)
    windows, spans, positions, kw = _stage_case()
    steps = []
    forward = decode_graph.DecodeStep._forward
    monkeypatch.setattr(decode_graph.DecodeStep, "_forward", lambda self: (steps.append(1), forward(self))[1])
    for pos in (None, positions):
        want = sample_replies(model, windows, spans, positions=pos, **kw)
        n = len(steps)
        got = sample_replies(model, windows, spans, positions=pos, graphs=True, **kw)
        assert len(steps) > n + 5  # the fixed-shape step ran
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b), kind
    # The logits of one position: the step against the ordinary forward of the same prefix.
    from kdtrain.models.generate import _forward_positions, decode_state

    b, L = 3, T
    caches, rope = decode_state(model, b, L, torch.device("cpu"), zeroed=True)

    starts = torch.tensor(np.stack([np.where(np.arange(L) >= 7, 7, 0) * (i > 0) for i in range(b)]))  # row 0: window
    doc = torch.arange(L).unsqueeze(0) - starts  # rows 1, 2: a document from slot 7 on
    with torch.no_grad():
        _forward_positions(model, windows[:, :12], 0, rope, caches, doc[:, :12].contiguous())
        want = _forward_positions(model, windows[:, 12:13], 12, rope, caches, doc[:, 12:13].contiguous())
        step = decode_graph.DecodeStep(model, caches, rope, b, L, graph=False)
        got = step(windows[:, 12], 12, doc[:, 12])  # rows 1, 2 see slots 7.. (12 - their position 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="CUDA device"):
        decode_graph.DecodeStep(model, caches, rope, b, L, graph=True)


# Ops that read a device value on the host or size their output by data (a device sync on CUDA).
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim", "_unique2",
              "unique_consecutive", "argwhere", "repeat_interleave", "lift_fresh", "masked_scatter"}


def _DispatchedOps():
    """A dispatch mode recording the name of every op torch runs under it (``.names``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    return Ops()


def test_a_draw_with_top_k_reads_nothing_on_the_host():
    """The decoder reads the device every 16 positions only; a draw with top-k (alone or with
    top-p) must not read it at every one: ties at the candidates' cut, which topk resolves
    arbitrarily, are settled on the device (rows of many tied logits, as bf16 gives; which ones are
    kept: test_candidates_are_the_stable_sorts_first). Top-p without top-k grows its candidate
    pool by a host decision (not held to this)."""
    from kdtrain.models.generate import pick_tokens

    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (6, 300), generator=g).float()  # ties everywhere, at every cut
    u = torch.rand(6, generator=g, dtype=torch.float64)
    for top_k, top_p in ((20, 1.0), (20, 0.8), (1, 1.0)):
        with _DispatchedOps() as ops:
            got = pick_tokens(logits, 300, 1.0, u, None, top_k, top_p)
        assert "topk" in ops.names and not ops.names & HOST_READS, (top_k, top_p, ops.names & HOST_READS)
        # The reference: candidates ranked by value, then id; kept by the same rules.
        order = sorted(range(300), key=lambda c: (-float(logits[0, c]), c))[:top_k]
        assert int(got[0]) in order
    # top-1 with ties: the lowest id of the maximum (what greedy decoding picks).
    assert torch.equal(pick_tokens(logits, 300, 1.0, u, None, 1, 1.0), logits.argmax(dim=-1))


def test_candidates_are_the_stable_sorts_first():
    """The candidates of a filtered draw are the first n of the row stably sorted by value (ties to
    the lower id), ranked so: on rows of many ties, with -inf padding, n up to the row's width."""
    from kdtrain.models.generate import _candidates

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        b, w = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 50, (1,), generator=g))
        z = torch.randint(0, int(torch.randint(1, 6, (1,), generator=g)), (b, w), generator=g).double()
        if trial % 3 == 0:
            z[:, w - int(torch.randint(0, w, (1,), generator=g)):] = float("-inf")
        n = int(torch.randint(1, w + 1, (1,), generator=g))
        vals, ids = _candidates(z, 7, n, None)
        want_vals, want_ids = z.sort(dim=-1, descending=True, stable=True)
        finite = want_vals[:, :n] > float("-inf")  # among -inf (padding) any order: zero probability
        assert torch.equal(vals, want_vals[:, :n]), trial
        assert torch.equal(ids[finite].long(), (want_ids[:, :n] + 7)[finite]), trial


def test_fixed_shape_decode_step_reads_nothing_on_the_host(world_of_one):
    """What CUDA-graph capture needs, checked on CPU: the fixed-shape step's ops (every op torch
    dispatches while it runs) include none that reads a device value on the host or sizes its
    output by data (``.item()``, ``nonzero``, boolean indexing, ...) and none that makes a tensor
    from host data; the ordinary decoder's position (a slice at a host offset) is not held to this."""
    import kdtrain.models.decode_graph as decode_graph
    from kdtrain.models.generate import decode_state

    for kind in ("llama", "qwen3", "gpt2"):
        model = _model(kind)
        b, L = 3, T
        caches, rope = decode_state(model, b, L, torch.device("cpu"), zeroed=True)
        step = decode_graph.DecodeStep(model, caches, rope, b, L, graph=False)
        step.tokens.copy_(torch.randint(0, V, (b, 1)))
        step.slot.fill_(9)
        step.positions.fill_(9)
        with torch.no_grad(), _DispatchedOps() as ops:
            step._forward()
        assert not ops.names & HOST_READS, (kind, ops.names & HOST_READS)
        assert "index_copy_" in ops.names and "embedding" in ops.names  # the step did run


def test_cached_attention_never_asks_sdpa_for_grouped_heads_under_a_mask(world_of_one, monkeypatch):
    """With a mask (attention within documents, the fixed-shape decode step) CUDA's SDPA has no
    fused kernel for grouped query heads and falls back to materialising every head's scores and
    copies of the cache; the cached decoder hands it ungrouped heads (decoding: each group's query
    heads as its queries) and samples what it did (the tests above)."""
    import numpy as np
    import torch.nn.functional as F

    import kdtrain.models.layer as layer
    from kdtrain.data.gpt_dataset import positions_from_starts
    from kdtrain.models.generate import sample_replies

    calls = []
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa))
        return real(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(layer.F, "scaled_dot_product_attention", sdpa)
    model = _model("llama")  # 4 query heads in 2 groups
    windows = torch.randint(1, V, (2, T), generator=torch.Generator().manual_seed(5))
    positions = torch.tensor(np.stack([positions_from_starts(T, np.array([s])) for s in (6, 9)]))
    for graphs in (False, True):
        calls.clear()
        sample_replies(model, windows, [[(10, 14)], [(4, 7)]], sample_ids=[0, 1], positions=positions,
                       vocab_size=V, temperature=0.0, seed=0, graphs=graphs)
        masked = [gqa for has_mask, gqa in calls if has_mask]
        assert masked and not any(masked), calls
