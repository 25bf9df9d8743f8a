"""Weighted corpora (data.weights, kdtrain/data/blend.py): proportions, interleaving, every corpus
walking its own epochs, layout-free determinism, held-out windows, the run's config and the
teacher cache's dataset identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdtrain.config import DataConfig, load_model_config, load_pretrain_config
from kdtrain.data import BlendedWindowDataset, GPTWindowDataset, write_indexed_dataset
from kdtrain.data.blend import BLOCK, blend_schedule

S = 16


def _corpus(tmp_path: Path, name: str, lo: int, n_tokens: int) -> str:
    """A corpus whose ids lie in [lo, lo + 100): a window's ids tell which corpus it came from."""
    rng = np.random.default_rng(lo)
    write_indexed_dataset(str(tmp_path / name), [rng.integers(lo, lo + 100, size=n_tokens)], 1000,
                          {"tokenizer_fingerprint": "f00d"})
    return str(tmp_path / name)


@pytest.fixture
def corpora(tmp_path):
    # Very different sizes: the small one repeats many epochs while the large one is in its first.
    return [_corpus(tmp_path, "small", 0, 40 * S + 1), _corpus(tmp_path, "mid", 200, 400 * S + 1),
            _corpus(tmp_path, "large", 400, 4000 * S + 1)]


def _blend(prefixes, weights, seed=7):
    return BlendedWindowDataset([GPTWindowDataset([p], S, split=(0.9, 0.1), seed=seed + i)
                                 for i, p in enumerate(prefixes)], weights)


def test_schedule_proportions_and_interleaving():
    for weights in ([0.2, 0.3, 0.5], [1, 1], [5, 1, 1, 1], [0.999, 0.001]):
        choice, rank, counts = blend_schedule(weights)
        share = np.asarray(weights) / sum(weights)
        assert counts.sum() == BLOCK and np.all(np.abs(counts - share * BLOCK) <= 1), (weights, counts)
        # Every prefix of the block is within one sample per corpus of its share: interleaved, not in runs.
        seen = np.zeros(len(weights))
        for i, c in enumerate(choice):
            assert rank[i] == seen[c]
            seen[c] += 1
            assert np.all(np.abs(seen - share * (i + 1)) <= 1 + 1e-9), (weights, i)


def test_samples_follow_the_weights_and_each_corpus_walks_its_epochs(corpora):
    weights = [0.2, 0.3, 0.5]
    ds = _blend(corpora, weights)
    n = 2 * BLOCK + 123
    source = [int(ds.train_sample(g)[0]) // 200 for g in range(n)]  # 0 small, 1 mid, 2 large
    assert [ds.source_of(g)[0] for g in range(n)] == source
    share = np.bincount(source, minlength=3) / n
    assert np.all(np.abs(share - np.asarray(weights)) < 2 / BLOCK + 3 / n), share
    # Corpus c serves its own samples 0, 1, 2, ... in order: whole shuffled epochs, no window skipped
    # or doubled within one, the small corpus many times over.
    locals_ = {c: [ds.source_of(g)[1] for g in range(n) if source[g] == c] for c in range(3)}
    for c, idx in locals_.items():
        assert idx == list(range(len(idx)))
        comp = ds.components[c]
        first_epoch = [comp.train_window_index(j) for j in range(min(len(idx), comp.num_train_windows))]
        assert len(set(first_epoch)) == len(first_epoch)
    assert len(locals_[0]) > 10 * ds.components[0].num_train_windows  # 36 windows, ~1660 samples
    for g in (0, 1, BLOCK - 1, BLOCK, n - 1):
        c, j = ds.source_of(g)
        np.testing.assert_array_equal(ds.train_sample(g), ds.components[c].train_sample(j))


def test_sample_g_depends_only_on_g_weights_and_seed(corpora):
    a, b = _blend(corpora, [1, 2, 3]), _blend(corpora, [1, 2, 3])
    order = np.random.default_rng(0).permutation(3000)
    got = {int(g): b.train_sample(int(g)) for g in order}  # any order of access, a fresh object
    for g in range(3000):
        np.testing.assert_array_equal(a.train_sample(g), got[g])
    other = _blend(corpora, [3, 2, 1])
    assert any(not np.array_equal(a.train_sample(g), other.train_sample(g)) for g in range(50))


def test_held_out_samples_follow_the_mixture(corpora):
    """Any prefix of the held-out samples (what an evaluation reads) is mixed by weight: corpus
    shares within one sample of the weights, each corpus walking (and cycling) its own held-out
    windows in order. Held-out one corpus after another would put the first 4 + 40 samples on
    the two small corpora only."""
    ds = _blend(corpora, [1, 2, 3])
    comps = ds.components
    assert ds.num_valid_windows == sum(c.num_valid_windows for c in comps) == 4 + 40 + 400
    assert ds.num_train_windows == sum(c.num_train_windows for c in comps)
    seen = [0, 0, 0]
    for j in range(ds.num_valid_windows):
        c, k = ds.valid_source_of(j)
        assert k == seen[c] % comps[c].num_valid_windows
        np.testing.assert_array_equal(ds.valid_sample(j), comps[c].valid_sample(k))
        seen[c] += 1
        if j + 1 in (6, 60, 444):
            n = j + 1
            assert all(abs(seen[i] - n * w / 6) <= 1 for i, w in enumerate([1, 2, 3])), (n, seen)
    with pytest.raises(IndexError):
        ds.valid_sample(ds.num_valid_windows)


def test_run_config_and_cache_identity(corpora, tmp_path):
    from kdtrain.cache.manifest import dataset_identity
    from kdtrain.training.pretrain import open_dataset

    model = load_model_config("tiny")
    data = DataConfig(path=corpora, weights=[1.0, 1.0, 2.0], seq_length=S, split=(0.9, 0.1), seed=7)
    ds = open_dataset(data, model)
    assert isinstance(ds, BlendedWindowDataset)
    np.testing.assert_array_equal(ds.train_sample(5), _blend(corpora, [1, 1, 2]).train_sample(5))
    # Without weights: the concatenated stream, as before.
    plain = open_dataset(DataConfig(path=corpora, seq_length=S, split=(0.9, 0.1), seed=7), model)
    assert isinstance(plain, GPTWindowDataset)
    # A teacher cache written for other weights (or none) is another dataset.
    ids = [dataset_identity(DataConfig(path=corpora, weights=w, seq_length=S)) for w in (None, [1, 1, 2], [1, 1, 3])]
    assert len({repr(i) for i in ids}) == 3
    cfg = load_pretrain_config("tiny", [f"data.path=[{','.join(corpora)}]", "data.weights=[0.5,0.25,0.25]"])
    assert cfg.data.weights == [0.5, 0.25, 0.25]
    for bad, msg in ((["data.weights=[1,2]"], "2 weights for 3 paths"),
                     (["data.weights=[1,0,2]"], "must be > 0 with a finite sum"),
                     (["data.weights=[1e308,1e308,1]"], "must be > 0 with a finite sum")):  # sum overflowed
        with pytest.raises(ValueError, match=rf"data.weights: {msg}"):
            load_pretrain_config("tiny", [f"data.path=[{','.join(corpora)}]", *bad])
    with pytest.raises(ValueError, match="data.weights: corpora \\[1\\] would get no sample"):
        _blend(corpora[:2], [1.0, 1e-5])


def test_pretraining_on_blended_corpora_learns(world_of_one, tiny_corpus, tmp_path, monkeypatch):
    """The entry point end to end on two weighted corpora (the demo corpus and a second copy of it
    under another prefix): training windows come from both, the model learns, and the held-out
    evaluation reads both corpora's held-out windows."""
    import shutil

    import kdtrain.training.pretrain as loop
    from conftest import read_metrics
    from kdtrain.training.pretrain import pretrain

    opened = []
    real_open = loop.open_dataset
    monkeypatch.setattr(loop, "open_dataset", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])

    second = tmp_path / "second"
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{tiny_corpus['prefix']}{ext}", f"{second}{ext}")
    cfg = load_pretrain_config("tiny", [
        f"data.path=[{tiny_corpus['prefix']},{second}]", "data.weights=[3,1]",
        f"data.tokenizer={tiny_corpus['tokenizer']}",
        "data.seq_length=32", "precision.device=cpu", "training.train_steps=12", "training.eval_batches=1",
        "optimizer.lr=3e-3", "optimizer.warmup_steps=0", f"logging.dir={tmp_path / 'run'}", "checkpoint.dir=null"])
    pretrain(cfg)
    train = read_metrics(tmp_path / "run")
    assert train[12]["loss"] < 0.9 * train[1]["loss"]  # from ln(512) = 6.24 at init
    valid = read_metrics(tmp_path / "run", "valid")
    assert np.isfinite(valid[12]["valid_loss"])
    # What the run drew: its 12 steps' samples come from both corpora, about 3:1, and its one
    # held-out batch reads both.
    (ds,) = opened
    assert isinstance(ds, BlendedWindowDataset) and len(ds.components) == 2
    drawn = [ds.source_of(g)[0] for g in range(12 * cfg.training.global_batch_size)]
    assert 0.6 < drawn.count(0) / len(drawn) < 0.9, drawn.count(0)
    held_out = {ds.valid_source_of(j)[0] for j in range(cfg.training.global_batch_size)}
    assert held_out == {0, 1}


def test_onpolicy_samples_each_window_as_its_corpus_is(tiny_corpus, tiny_chat_corpus):
    """On-policy steps on a blend of conversations and documents: a document window is written
    after the prompt, a conversation window at its replies (before, the blend's loss mask made
    every document window look like a reply under way: nothing was sampled there)."""
    from kdtrain.config.distill import OnPolicyConfig
    from kdtrain.data.chat import reply_spans
    from kdtrain.training.onpolicy import onpolicy_spans

    seq = 64
    ds = BlendedWindowDataset([GPTWindowDataset([tiny_corpus["prefix"]], seq, seed=1),
                               GPTWindowDataset([tiny_chat_corpus["prefix"]], seq, seed=2)], [1.0, 1.0])
    ids = range(40)
    kinds = [ds.source_of(g)[0] for g in ids]
    assert set(kinds) == {0, 1}
    for replies in ("first", "all"):
        spans = onpolicy_spans(ds, ids, OnPolicyConfig(fraction=1.0, prompt_length=16, replies=replies), seq + 1)
        for g, kind, row in zip(ids, kinds, spans):
            if kind == 0:
                assert row == [(16, seq + 1)], g
            else:
                expect = reply_spans(ds.train_loss_mask(g))
                assert row == (expect if replies == "all" else expect[:1]), g
        assert any(row for row, kind in zip(spans, kinds) if kind == 1)


def test_a_corpus_too_small_for_a_held_out_window_only_trains(tmp_path):
    """In a blend, a corpus whose share of held-out windows rounds to none trains and the
    evaluation reads the others (the skip existed, but the corpus refused to open first); when no
    corpus has a held-out window the run is refused, naming data.split."""
    from kdtrain.training.pretrain import open_dataset

    rng = np.random.default_rng(0)
    write_indexed_dataset(str(tmp_path / "big"), [rng.integers(1, 50, 40) for _ in range(100)], 64, {"eos_id": 0})
    write_indexed_dataset(str(tmp_path / "small"), [rng.integers(1, 50, 40) for _ in range(3)], 64, {"eos_id": 0})
    model = load_model_config("tiny")
    data = DataConfig(path=[str(tmp_path / "big"), str(tmp_path / "small")], weights=[0.5, 0.5], seq_length=16,
                      split=(0.95, 0.05))
    ds = open_dataset(data, model)
    big, small = ds.components
    assert small.num_valid_windows == 0 < big.num_valid_windows == ds.num_valid_windows
    assert small.num_train_windows > 0
    assert {ds.source_of(g)[0] for g in range(64)} == {0, 1}
    for j in range(ds.num_valid_windows):
        assert np.array_equal(ds.valid_sample(j), big.valid_sample(j))
    data.path, data.weights = [str(tmp_path / "small")] * 2, [0.5, 0.5]
    with pytest.raises(ValueError, match="data.split: held-out share 0.05 requested, but none of the corpora"):
        open_dataset(data, model)
    with pytest.raises(ValueError, match="held-out split 0.05 requested"):  # one corpus, no weights: as before
        GPTWindowDataset([str(tmp_path / "small")], 16, split=(0.95, 0.05))


def test_a_stop_token_that_ends_no_reply_is_refused(tiny_chat_corpus):
    """On-policy on conversations: a stop token the corpus' replies never contain would let every
    sampled reply run to the window's end (a base tokenizer's EOS next to a chat template's own
    end-of-turn token). The run is refused at start, naming the field and the ids the replies end
    with; the corpus' own EOS (the plain template ends each reply with it) and -1 pass."""
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.onpolicy import check_stop_token

    ds = GPTWindowDataset([tiny_chat_corpus["prefix"]], 64, seed=2)
    absent = next(i for i in range(511, 0, -1)
                  if all(i not in ds.train_sample(g)[a:b] for g in range(64) for a, b in ds.train_reply_spans(g)))
    no_eos = GPTWindowDataset([tiny_chat_corpus["prefix"]], 64, seed=2)
    no_eos.__class__ = type("NoEos", (GPTWindowDataset,), {"eos_id": None})  # a corpus that records none
    with pytest.raises(ValueError, match=r"onpolicy\.stop_token: unset, and the corpus records no EOS id"):
        check_stop_token(no_eos, load_distill_config("tiny", ["data.mock=true", "onpolicy.fraction=0.5"]))
    for stop, refused in ((None, False), (-1, False), (absent, True)):
        extra = [] if stop is None else [f"onpolicy.stop_token={stop}"]
        cfg = load_distill_config("tiny", ["data.mock=true", "onpolicy.fraction=0.5", *extra])
        if refused:
            with pytest.raises(ValueError, match=rf"onpolicy\.stop_token: id {absent} occurs in none of the \d+ "
                                                 r"whole replies .*\(the replies end with ids \d+"):
                check_stop_token(ds, cfg)
        else:
            check_stop_token(ds, cfg)
