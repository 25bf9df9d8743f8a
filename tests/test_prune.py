"""Pruned students (kdtrain/prune): slicing is exact where the math says it is, importance finds
planted signals, and ``kdtrain prune`` turns a Hugging Face teacher into a student that starts
closer to the teacher than a random one.

Exactness: dropping query groups, MLP neurons and whole layers equals zeroing their output
projections in the teacher, so the pruned student's logits must equal the zeroed teacher's
(fp32, CPU, 1e-5 on logits of magnitude ~1).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kdtrain.config import ModelConfig, load_model_config
from kdtrain.prune.select import Selection, build_selection, prune_state, pruned_config

B, S, V = 2, 12, 211


def _cfg(kind: str) -> ModelConfig:
    common = dict(name=kind, num_layers=3, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=V,
                  max_seq_length=64, init_std=0.1)
    if kind == "llama":
        return ModelConfig(**common, num_query_groups=2)
    if kind == "qwen2":
        return ModelConfig(**common, num_query_groups=2, add_qkv_bias=True, tie_embeddings=True)
    if kind == "qwen3":
        return ModelConfig(**dict(common, num_attention_heads=4), num_query_groups=2, kv_channels=24,
                           qk_layernorm=True, tie_embeddings=True)
    return ModelConfig(**common, normalization="layernorm", activation="gelu_tanh", position_embedding="learned",
                       add_bias_linear=True, tie_embeddings=True)


def _model(cfg: ModelConfig, seed: int = 0):
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    cfg.check()
    model = build_gpt(cfg, build_role_groups(RoleLayout("m", 0, 1, 1, 1)), device=torch.device("cpu"),
                      dtype=torch.float32, seed=seed).eval()
    with torch.no_grad():  # non-trivial norms and biases
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def _global_state(model, cfg) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        spec = model.param_specs[name]
        if spec.tied_copy:
            continue
        out[spec.global_name] = p.detach()[:cfg.vocab_size].clone() if spec.is_vocab else p.detach().clone()
    return out


def _load_state(model, state):
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = state[model.param_specs[name].global_name]
            p.zero_()
            p[:t.shape[0]].copy_(t) if model.param_specs[name].is_vocab else p.copy_(t)


def _logits(model, cfg, tokens):
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    with torch.no_grad():
        return model(tokens, pos, None).transpose(0, 1)[..., :cfg.vocab_size]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
def test_pruning_groups_neurons_and_layers_is_exact(kind, world_of_one):
    cfg = _cfg(kind)
    teacher = _model(cfg)
    state = _global_state(teacher, cfg)
    rng = np.random.default_rng(0)
    layers = [0, 2]
    groups = [[1], [0]]
    ffn = [sorted(rng.choice(cfg.ffn_hidden_size, 40, replace=False).tolist()) for _ in layers]
    sel = Selection(layers, groups, ffn, list(range(cfg.hidden_size)))
    scfg, sstate = prune_state(state.__getitem__, cfg, sel, "student")
    hpg = cfg.num_attention_heads // cfg.num_query_groups  # 2 (GQA) or 1 (GPT-2: every head its own group)
    assert (scfg.num_layers, scfg.num_query_groups, scfg.num_attention_heads, scfg.ffn_hidden_size) == (2, 1, hpg, 40)
    student = _model(scfg, seed=7)
    _load_state(student, sstate)

    # The reference: the teacher with the removed parts' output projections set to zero.
    zeroed = dict(state)
    d = cfg.kv_channels
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        proj, fc2 = zeroed[p + "self_attention.linear_proj.weight"].clone(), zeroed[p + "mlp.linear_fc2.weight"].clone()
        if layer not in layers:
            proj.zero_()
            fc2.zero_()
            for bias in ("self_attention.linear_proj.bias", "mlp.linear_fc2.bias"):
                if p + bias in zeroed:
                    zeroed[p + bias] = torch.zeros_like(zeroed[p + bias])
        else:
            i = layers.index(layer)
            for g in range(cfg.num_query_groups):
                if g not in groups[i]:
                    proj[:, g * hpg * d:(g + 1) * hpg * d] = 0
            fc2[:, [n for n in range(cfg.ffn_hidden_size) if n not in ffn[i]]] = 0
        zeroed[p + "self_attention.linear_proj.weight"], zeroed[p + "mlp.linear_fc2.weight"] = proj, fc2
    _load_state(teacher, zeroed)
    tokens = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    ref, got = _logits(teacher, cfg, tokens), _logits(student, scfg, tokens)
    assert ref.std() > 0.1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_keeping_everything_is_the_teacher():
    cfg = _cfg("qwen3")
    cfg.check()
    from kdtrain.convert.layout import expected_shapes

    state = {k: torch.randn(s) for k, s in expected_shapes(cfg).items()}
    scfg, sstate = prune_state(state.__getitem__, cfg, Selection.everything(cfg), cfg.name)
    assert scfg == cfg and sstate.keys() == state.keys()
    assert all(torch.equal(sstate[k], state[k]) for k in state)


def test_selection_errors_name_the_problem():
    cfg = _cfg("llama")
    cfg.check()
    with pytest.raises(ValueError, match="layers must be increasing"):
        pruned_config(cfg, dataclasses.replace(Selection.everything(cfg), layers=[2, 1, 0]), "x")
    with pytest.raises(ValueError, match="same number of MLP neurons"):
        pruned_config(cfg, dataclasses.replace(Selection.everything(cfg), ffn=[[0, 1], [0], [5, 6]]), "x")
    with pytest.raises(ValueError, match="needs importance scores"):
        build_selection(cfg, ffn_hidden_size=48)
    with pytest.raises(ValueError, match=r"--num-query-groups must be in \[1, 2\]"):
        build_selection(cfg, num_query_groups=3, group_scores=[torch.ones(2)] * 3)
    assert build_selection(cfg, num_layers=2).layers == [0, 2]  # evenly spaced without scores


def test_importance_finds_planted_signals(world_of_one):
    """A layer whose output projections are zero has no influence; neurons, a query group and
    hidden channels given large activations rank first."""
    from kdtrain.prune.importance import activation_importance

    cfg = _cfg("llama")
    model = _model(cfg)
    params = dict(model.named_parameters())
    hpg, d, f = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size
    with torch.no_grad():
        params["decoder.layers.1.self_attention.linear_proj.weight"].zero_()
        params["decoder.layers.1.mlp.linear_fc2.weight"].zero_()
        for layer in range(cfg.num_layers):
            p = f"decoder.layers.{layer}."
            params[p + "mlp.linear_fc1.weight"][[f + 5, f + 17]] *= 50  # up rows of neurons 5 and 17
            value_rows = slice(1 * (hpg + 2) * d + (hpg + 1) * d, 2 * (hpg + 2) * d)  # group 1's value head
            params[p + "self_attention.linear_qkv.weight"][value_rows] *= 50
            for norm in ("input_layernorm", "pre_mlp_layernorm"):
                params[p + norm + ".weight"][[9, 33]] *= 50
    batches = [torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    logit_rows = []  # the scores read activations: no logits computed
    hook = model.output_layer.register_forward_hook(lambda m, args, out: logit_rows.append(out[0].shape[0]))
    imp = activation_importance(model, batches)
    hook.remove()
    assert logit_rows == [0, 0, 0]
    assert imp.samples == 3 * B
    assert imp.layers[1] < 1e-6 < imp.layers[0] and imp.layers[2] > 1e-6
    sel = build_selection(cfg, num_layers=2, layer_scores=imp.layers, ffn_hidden_size=2, ffn_scores=imp.ffn,
                          num_query_groups=1, group_scores=imp.groups, hidden_size=2, hidden_scores=imp.hidden)
    assert sel.layers == [0, 2] and sel.ffn == [[5, 17], [5, 17]] and sel.groups == [[1], [1]]
    assert sel.hidden == [9, 33]


def test_importance_counts_data_tokens_and_attends_within_documents(world_of_one):
    """Calibration as the run sees it (importance.CalibrationBatch): the padding after a packed
    window's data counts in no score (the window scores as its data alone), and with attention
    within documents a window holding documents A and B scores as the token-weighted mean of A and
    B scored alone (every per-token activation is the one of its document alone)."""
    from kdtrain.data.gpt_dataset import positions_from_starts
    from kdtrain.prune.importance import CalibrationBatch, activation_importance

    cfg = _cfg("llama")
    model = _model(cfg)
    tokens = torch.randint(1, V, (1, S), generator=torch.Generator().manual_seed(3))

    def close(a, b, hidden=True):
        pairs = [(a.layers, b.layers), *zip(a.ffn, b.ffn), *zip(a.groups, b.groups)]
        for x, y in pairs + ([(a.hidden, b.hidden)] if hidden else []):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)

    padded = tokens.clone()
    padded[0, 7:] = 0  # padding after 7 data tokens
    close(activation_importance(model, [CalibrationBatch(padded, content=torch.tensor([7]))]),
          activation_importance(model, [tokens[:, :7]]))
    # Two documents: A = [0, 5), B = [5, S).
    positions = torch.from_numpy(positions_from_starts(S, np.array([5]))).unsqueeze(0)
    whole = activation_importance(model, [CalibrationBatch(tokens, positions)])
    a, b = activation_importance(model, [tokens[:, :5]]), activation_importance(model, [tokens[:, 5:]])
    # One sample: a score is its mean over the tokens (the hidden score, an L2 norm over every
    # layer's norms, does not mix linearly and is left out).
    mix = lambda x, y: (5 * x + (S - 5) * y) / S  # noqa: E731
    close(whole, type(a)(layers=mix(a.layers, b.layers), hidden=None, ffn=[mix(x, y) for x, y in zip(a.ffn, b.ffn)],
                         groups=[mix(x, y) for x, y in zip(a.groups, b.groups)], samples=1), hidden=False)
    window = activation_importance(model, [tokens])
    assert not torch.allclose(window.hidden, whole.hidden, rtol=1e-4)  # attention over the window differs


def test_prune_cli_from_hf_teacher(tmp_path):
    """``kdtrain prune`` on a Hugging Face teacher with calibration data: the student (fewer layers,
    narrower MLP, fewer query groups and hidden channels) loads as a kdtrain model and exports to
    Hugging Face, and starts much closer to the teacher than a random student of its shape."""
    transformers = pytest.importorskip("transformers")
    from kdtrain.cli import main
    from kdtrain.convert.hf_export import export_hf
    from kdtrain.data.indexed import write_indexed_dataset

    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)).eval()
    teacher.save_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    write_indexed_dataset(str(tmp_path / "calib"), [rng.integers(0, V, 200).tolist() for _ in range(8)], V, {})
    assert main(["prune", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "pruned"), "--num-layers", "3",
                 "--ffn-hidden-size", "64", "--num-query-groups", "1", "--hidden-size", "56",
                 "--data", str(tmp_path / "calib"), "--seq-length", "32", "--calib-samples", "16",
                 "--packing", "best_fit", "--attention", "documents", "--device", "cpu"]) == 0
    cfg = load_model_config(str(tmp_path / "pruned" / "model.yaml"))
    assert (cfg.num_layers, cfg.ffn_hidden_size, cfg.num_query_groups, cfg.hidden_size, cfg.kv_channels) == \
        (3, 64, 1, 56, 16)
    record = json.loads((tmp_path / "pruned" / "prune.json").read_text())
    assert record["importance"]["samples"] == 16 and record["layer_order"] == "influence"
    assert record["calibration"] == {"data": [str(tmp_path / "calib")], "seq_length": 32, "packing": "best_fit",
                                     "attention": "documents"}
    tokens = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(9))

    def kl_to_teacher(model):
        with torch.no_grad():
            t = torch.log_softmax(teacher(tokens).logits, -1)
            s = torch.log_softmax(model(tokens).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    def student_and_random(pruned):
        student = transformers.AutoModelForCausalLM.from_pretrained(
            export_hf(pruned, tmp_path / f"hf_{pruned.name}", tokenizer=None)).eval()
        torch.manual_seed(1)
        return kl_to_teacher(student), kl_to_teacher(transformers.LlamaForCausalLM(student.config).eval())

    # Every dimension at once: a random teacher has no redundancy to spare (half its query groups
    # go), yet the student stays closer to it than a random one.
    pruned, scratch = student_and_random(tmp_path / "pruned")
    assert pruned < scratch, (pruned, scratch)
    # Depth by Block Influence and the MLP by neuron importance: most of the teacher survives.
    # Windows default to the teacher's max_seq_length when shorter than 1024 (here 64).
    assert main(["prune", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "mild"), "--num-layers", "3",
                 "--ffn-hidden-size", "80", "--data", str(tmp_path / "calib"), "--calib-samples", "16",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "mild" / "prune.json").read_text())["calibration"]["seq_length"] == 64
    pruned, scratch = student_and_random(tmp_path / "mild")
    assert pruned < 0.5 * scratch, (pruned, scratch)
    with pytest.raises(SystemExit) as exited:  # argparse: the two depth options exclude each other
        main(["prune", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--num-layers", "2",
              "--keep-layers", "0,1"])
    assert exited.value.code == 2
    assert main(["prune", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "y"),
                 "--ffn-hidden-size", "32"]) == 2  # width without calibration data: a clear error
    for args in (["--out", str(tmp_path / "hf"), "--num-layers", "2"],  # would overwrite the teacher
                 ["--out", str(tmp_path / "y"), "--keep-layers", "1-"],  # a range without its end
                 ["--out", str(tmp_path / "y"), "--ffn-hidden-size", "32", "--data", str(tmp_path / "calib"),
                  "--seq-length", "65"],  # beyond the teacher's positions
                 ["--out", str(tmp_path / "y"), "--num-layers", "2", "--micro-batch", "0"]):
        assert main(["prune", "--src", str(tmp_path / "hf"), *args]) == 2, args
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "y").exists()
    # Depth only (no calibration), the padded vocabulary trimmed to the tokenizer's ids.
    assert main(["prune", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "z"), "--keep-layers", "0,3",
                 "--vocab-size", str(V - 11)]) == 0
    z = load_model_config(str(tmp_path / "z" / "model.yaml"))
    assert (z.num_layers, z.vocab_size) == (2, V - 11)


def test_keep_layers_named_twice_and_an_unwritable_out_are_errors(tmp_path, capsys, monkeypatch):
    """``--keep-layers 1,1,2`` names layer 1 twice: an error, not a student of 2 layers. An --out
    below a regular file is refused before the teacher is read or scored."""
    from kdtrain.cli import main
    from kdtrain.convert.layout import expected_shapes
    from kdtrain.prune import cli as prune_cli
    from kdtrain.prune.cli import parse_layers
    from kdtrain.training.checkpoint import write_global_checkpoint

    assert parse_layers("2,0-1") == [0, 1, 2]
    for text, twice in (("1,1,2", "layer 1 "), ("0-3,2,3", "layers 2, 3 ")):
        with pytest.raises(ValueError, match=f"--keep-layers '{text}': {twice}named more than once"):
            parse_layers(text)
    for text in ("0,3-1", "3-1"):  # an empty range, else silently a student with fewer layers
        with pytest.raises(ValueError, match=f"--keep-layers '{text}': range 3-1 runs backwards"):
            parse_layers(text)
    cfg = _cfg("llama")
    cfg.check()
    state = {k: torch.randn(s) for k, s in expected_shapes(cfg).items()}
    write_global_checkpoint(tmp_path / "teacher", cfg, list(state), state.__getitem__, {}, 10**9)
    base = ["prune", "--src", str(tmp_path / "teacher"), "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "s"), "--keep-layers", "1,1,2"]) == 2
    assert "layer 1 named more than once" in capsys.readouterr().err and not (tmp_path / "s").exists()

    def no_scoring(*args, **kwargs):
        raise AssertionError("the teacher was scored before --out was checked")

    monkeypatch.setattr(prune_cli, "measure_importance", no_scoring)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "student"
    for args in (["--keep-layers", "0,2"], ["--ffn-hidden-size", "64", "--data", str(tmp_path / "calib")]):
        assert main(base + ["--out", str(out), *args]) == 2, args
        assert f"--out {out}: cannot create the directory" in capsys.readouterr().err


def test_kdtrain_help_does_not_import_torch():
    """The command's sub-commands register without loading torch or the model code."""
    import subprocess
    import sys

    code = ("import sys\nfrom kdtrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out[-500:]
