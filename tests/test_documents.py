"""Attention within documents (kdtrain/models/documents.py, ``data.attention: documents``).

The defining property: a window of several documents, run with their DocumentMask, gives every
document the logits a forward of that document alone gives (Llama-style GQA with rotary, Qwen3's
query/key norms, GPT-2's learned positions; on the direct layers and compiled ones), and so the
logits a Hugging Face model gives for it. Positions come from the dataset's documents
(stream windows, packed windows, blends); the cached decoder follows the same rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import small_gpt
from kdtrain.config import ModelConfig
from kdtrain.data.gpt_dataset import positions_from_starts
from kdtrain.models.documents import DocumentMask

V = 97


def _model(kind: str):
    return small_gpt(kind, V)


def _alone(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] of one document [n] run by itself."""
    pos = torch.arange(len(tokens)).unsqueeze(0)
    return model(tokens.unsqueeze(0), pos, None)[:, 0, :V]


def test_positions_from_starts():
    assert positions_from_starts(7, np.array([3, 5])).tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert positions_from_starts(4, np.array([], dtype=np.int64)).tolist() == [0, 1, 2, 3]
    assert positions_from_starts(3, np.array([0, 0, 2])).tolist() == [0, 1, 0]


def test_mask_is_causal_within_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 0, 1]])
    allowed = DocumentMask(pos).allowed
    assert allowed.shape == (2, 1, 5, 5)
    seg = [[0, 0, 0, 1, 1], [0, 0, 1, 2, 2]]
    for b in range(2):
        for i in range(5):
            for j in range(5):
                assert bool(allowed[b, 0, i, j]) == (j <= i and seg[b][i] == seg[b][j]), (b, i, j)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2"])
def test_each_document_as_if_alone(kind, world_of_one):
    model = _model(kind).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [[5, 9, 2], [16], [1, 7, 8]]  # three rows of 16 tokens
    tokens = torch.randint(0, V, (3, 16), generator=g)
    pos = torch.tensor(np.stack([positions_from_starts(16, np.cumsum(row)[:-1]) for row in lengths]))
    with torch.no_grad():
        packed = model(tokens, pos, DocumentMask(pos))[..., :V]  # [s, b, V]
        window = model(tokens, torch.arange(16).expand(3, 16), None)[..., :V]
        for b, row in enumerate(lengths):
            at = 0
            for n in row:
                alone = _alone(model, tokens[b, at:at + n])
                torch.testing.assert_close(packed[at:at + n, b], alone, rtol=1e-5, atol=1e-5)
                at += n
    # Without the mask the later documents see the earlier ones: different logits.
    assert not torch.allclose(packed[5:, 0], window[5:, 0], atol=1e-3)
    torch.testing.assert_close(packed[:, 1], window[:, 1], rtol=1e-5, atol=1e-5)  # one document: the same


def test_gradients_do_not_cross_documents(world_of_one):
    """The loss of the second document has no gradient with respect to the first one's
    embeddings (what 'not attended' means for training)."""
    model = _model("llama")
    tokens = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor(positions_from_starts(12, np.array([4])))[None]
    emb = model.embedding(input_ids=tokens, position_ids=pos).detach().requires_grad_()
    out = model(tokens, pos, DocumentMask(pos), decoder_input=emb)
    out[4:].float().pow(2).sum().backward()
    assert float(emb.grad[:4].abs().max()) == 0.0 and float(emb.grad[4:].abs().max()) > 0.0



@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_layers_share_one_mask_for_the_backward(kind, world_of_one):
    """Every layer's attention keeps its mask for the backward: one tensor shared by all of them,
    not a float copy per layer (SDPA converts a bool mask in every call: at s = 8192 in bf16 that
    was 128 MiB per layer, 4 GiB for 32 layers)."""
    model = small_gpt(kind, V, num_layers=4)
    s = 16
    tokens = torch.randint(0, V, (2, s), generator=torch.Generator().manual_seed(5))
    pos = torch.tensor(np.stack([positions_from_starts(s, np.array([6])), positions_from_starts(s, np.array([3, 9]))]))
    masks = set()

    def keep(t):
        if t.dim() == 4 and t.shape[1] == 1 and tuple(t.shape[-2:]) == (s, s):  # [b, 1, s, s]: a mask
            masks.add(t.untyped_storage().data_ptr())
        return t

    mask = DocumentMask(pos)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(tokens, pos, mask)
    assert len(masks) == 1, f"{len(masks)} [.., s, s] masks kept for the backward by {len(model.decoder.layers)} layers"
    # The micro-batch keeps its DocumentMask for the whole step: the float mask is not kept there
    # (only the backward holds it, through autograd).
    assert mask._bias is None and mask._rope is None
    out.float().square().sum().backward()  # and the backward runs on the shared one


def test_stock_layers_refused(world_of_one):
    model = _model("llama")
    for layer in model.decoder.layers:
        layer._direct = False
    pos = torch.tensor([[0, 1, 0, 1]])
    try:
        with pytest.raises(ValueError, match="data.attention: documents needs kdtrain's local layers"):
            model(torch.zeros(1, 4, dtype=torch.long), pos, DocumentMask(pos))
    finally:
        for layer in model.decoder.layers:
            layer._direct = True


def _doc_id_of_tokens(lengths) -> np.ndarray:
    """Document index of every token of documents of the given lengths laid end to end."""
    return np.repeat(np.arange(len(lengths)), lengths)


def _expected_positions(doc_of: np.ndarray) -> np.ndarray:
    """Offsets from the start of each run of equal document ids (the window's first token starts one)."""
    starts = np.flatnonzero(np.diff(doc_of)) + 1
    return positions_from_starts(len(doc_of), starts)


def test_stream_windows_restart_positions_at_document_starts(tmp_path):
    from kdtrain.data import write_indexed_dataset
    from kdtrain.data.gpt_dataset import GPTWindowDataset

    rng = np.random.default_rng(0)
    lengths = [[7, 1, 30, 12, 5], [9, 40, 3]]  # two corpora: their boundary is a document boundary too
    for i, ls in enumerate(lengths):
        write_indexed_dataset(str(tmp_path / f"c{i}"), [rng.integers(1, 50, n) for n in ls], 50, {"eos_id": 0})
    prefixes = [str(tmp_path / f"c{i}") for i in range(2)]
    S = 10
    ds = GPTWindowDataset(prefixes, S, split=(0.8, 0.2), document_positions=True)
    plain = GPTWindowDataset(prefixes, S, split=(0.8, 0.2))
    doc_of = _doc_id_of_tokens(lengths[0] + lengths[1])
    for w in range(ds.num_windows):
        got = ds.window_positions(w)
        assert got.dtype == np.int64 and got.shape == (S + 1,)
        assert np.array_equal(got, _expected_positions(doc_of[w * S: w * S + S + 1])), w
    assert np.array_equal(ds.train_positions(3), ds.window_positions(ds.train_window_index(3)))
    assert np.array_equal(ds.valid_positions(0), ds.window_positions(ds.num_train_windows))
    assert plain.train_positions(0) is None and plain.valid_positions(0) is None


@pytest.mark.parametrize("packing", ["documents", "best_fit"])
def test_packed_windows_restart_positions_at_pieces_and_padding(tmp_path, packing):
    from kdtrain.data import write_indexed_dataset
    from kdtrain.data.blend import BlendedWindowDataset
    from kdtrain.data.gpt_dataset import GPTWindowDataset

    rng = np.random.default_rng(1)
    lengths = [5, 12, 9, 30, 2, 17, 8, 11]
    write_indexed_dataset(str(tmp_path / "c"), [rng.integers(1, 50, n) for n in lengths], 50, {"eos_id": 0})
    S = 16
    ds = GPTWindowDataset([str(tmp_path / "c")], S, split=(1.0, 0.0), packing=packing, document_positions=True)
    for w in range(ds.num_windows):
        pieces = [n for _, n, _ in ds.packed.pieces(w)]
        fill = sum(pieces)
        # Each piece its own document; the padding (if any) one more.
        piece_of = np.repeat(np.arange(len(pieces) + 1), pieces + [S + 1 - fill])
        assert np.array_equal(ds.window_positions(w), _expected_positions(piece_of)), w
    # A blend hands out its corpora's positions for the samples it takes from them.
    other = GPTWindowDataset([str(tmp_path / "c")], S, split=(1.0, 0.0), seed=9, document_positions=True)
    blend = BlendedWindowDataset([ds, other], [0.5, 0.5])
    for g in range(6):
        c, local = blend.source_of(g)
        assert np.array_equal(blend.train_positions(g), blend.components[c].train_positions(local))


def test_microbatch_carries_the_documents():
    from kdtrain.training.batches import make_microbatch

    windows = np.arange(2 * 9).reshape(2, 9)
    positions = np.stack([positions_from_starts(9, np.array([3])), positions_from_starts(9, np.array([]))])
    mb = make_microbatch(windows, torch.device("cpu"), positions=positions)
    assert torch.equal(mb.position_ids, torch.from_numpy(positions[:, :-1]))
    assert torch.equal(mb.attention_mask.positions, mb.position_ids)
    # The [b, 1, s, s] mask exists only while a forward needs it (a step's micro-batches are all
    # built before its first forward).
    assert mb.attention_mask._allowed is None
    assert not bool(mb.attention_mask.allowed[0, 0, 3, 2]) and bool(mb.attention_mask.allowed[1, 0, 3, 2])
    mb.attention_mask.bias(torch.float32)
    assert mb.attention_mask._allowed is None  # the layers need only the bias
    mb.attention_mask.release()
    assert mb.attention_mask._allowed is None and mb.attention_mask._bias is None
    plain = make_microbatch(windows, torch.device("cpu"))
    assert plain.attention_mask is None and torch.equal(plain.position_ids, torch.arange(8).expand(2, 8))


def _compiled_documents(rank, world):
    import os

    from torch._dynamo.utils import counters

    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    os.environ["KDTRAIN_COMPILE_BACKEND"] = "aot_eager"
    cfg = ModelConfig(name="llama", num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, vocab_size=V, max_seq_length=64, init_std=0.1)
    cfg.check()
    groups = build_role_groups(RoleLayout("m", 0, 1, 1, 1))
    eager, compiled = (build_gpt(cfg, groups, device=torch.device("cpu"), dtype=torch.float32, seed=2, compile=c)
                       for c in (False, True))
    tokens = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    counters.clear()
    for step in range(2):  # a new DocumentMask (other documents) on the second call: no recompilation
        pos = torch.tensor(np.stack([positions_from_starts(20, np.array([3 + step, 11])),
                                     positions_from_starts(20, np.array([7 - step]))]))
        for model in (eager, compiled):
            model.zero_grad()
            logits = model(tokens, pos, DocumentMask(pos))
            logits.float().square().mean().backward()
            model.logits = logits.detach()
        torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compiled_layers_attend_within_documents(tmp_path):
    """precision.compile with data.attention: documents: the compiled layers take the mask and the
    gathered rotary table as graph inputs (no break, one graph for every layer and batch) and
    compute what the eager layers compute."""
    from conftest import run_spawn

    run_spawn(1, _compiled_documents, tmp_path=tmp_path)


@pytest.mark.slow
def test_pretraining_within_documents_across_stages_and_in_eval(world_of_one, short_chat_corpus, tmp_path, capsys):
    """Pretraining with data.attention: documents on short conversations: two pipeline stages
    (the masks on both, and through their backward, recomputed) follow the one-rank run; ``kdtrain eval``
    reproduces the run's logged held-out loss from the data section the checkpoint recorded (the
    attention with it), and attention over the window gives another."""
    from conftest import read_metrics, run_torchrun
    from kdtrain.cli import main
    from kdtrain.config import load_pretrain_config
    from kdtrain.training.pretrain import pretrain

    data = [f"data.path=[{short_chat_corpus}]", "data.seq_length=32", "data.split=[0.9,0.1]",
            "data.attention=documents", "training.train_steps=4", "training.eval_batches=1",
            "training.global_batch_size=8", "training.micro_batch_size=2", "precision.device=cpu"]
    pretrain(load_pretrain_config("tiny", data + [f"logging.dir={tmp_path / 'one'}",
                                                  f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    run_torchrun(2, "pretrain_gpt.py", ["--config", "tiny", *data, "parallel.pp=2", "training.recompute=true",
                                        f"logging.dir={tmp_path / 'pp2'}"])
    one, pp2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp2")
    assert sorted(one) == sorted(pp2) == [1, 2, 3, 4]
    for s in one:
        for k in ("loss", "grad_norm"):
            assert pp2[s][k] == pytest.approx(one[s][k], rel=1e-5, abs=1e-7), (s, k)
    logged = read_metrics(tmp_path / "one", "valid")[4]["valid_loss"]
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--max-windows", "8", "--device", "cpu",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert "attention within the documents" in capsys.readouterr().out
    got = json.loads((tmp_path / "eval.json").read_text())[str(tmp_path / "ckpt")]["targets_loss"]
    assert got == pytest.approx(logged, rel=1e-5)
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", short_chat_corpus, "--seq-length", "32",
                 "--split", "0.9", "0.1", "--attention", "window", "--max-windows", "8", "--device", "cpu",
                 "--out", str(tmp_path / "window.json")]) == 0
    window = json.loads((tmp_path / "window.json").read_text())[str(tmp_path / "ckpt")]["targets_loss"]
    assert abs(window - got) > 1e-4 * got
