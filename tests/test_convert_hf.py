"""Hugging Face interop: tiny random-init Llama / Qwen2 / GPT-2 -> kdtrain -> Hugging Face.

kdtrain logits must equal the HF logits in fp32 on CPU within ATOL (absolute, on logits of
magnitude ~1) for TP=1, TP=2 and PP=2; the round trip HF -> kdtrain -> HF must give identical
tensors and logits, also when the kdtrain checkpoint was re-saved from a TP=2 model (sharded
pieces, padded vocab). Vocab 301 is odd, so the 128*tp padding is exercised. No hub access: the
models are created from configs.
"""

import json
import math

import pytest
import torch

from conftest import run_spawn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ATOL = 1e-4
VOCAB = 301
B, S = 2, 16


def _hf_models() -> dict:
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return {
        # Llama 3.1 style: GQA, llama3 rope scaling, untied output layer.
        # End tokens other than LlamaConfig's defaults (1, 2): an export must keep them.
        "llama": lambda: LlamaForCausalLM(LlamaConfig(**common, max_position_embeddings=16384, rms_norm_eps=1e-5,
                                                      rope_parameters=llama3_rope, tie_word_embeddings=False,
                                                      bos_token_id=4, eos_token_id=0, pad_token_id=3)),
        # Qwen2: QKV bias, tied embeddings, rope theta 1e6.
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, max_position_embeddings=128, tie_word_embeddings=True,
                                                      rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 1e6})),
        # Qwen3: per-head query/key RMSNorm, head_dim (24) != hidden / heads (16), no biases.
        "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**common, head_dim=24, max_position_embeddings=128,
                                                      tie_word_embeddings=True, attention_bias=False,
                                                      rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 1e6})),
        # GPT-2: LayerNorm, gelu_new, learned positions, biases, Conv1D weights, tied embeddings.
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.1, bos_token_id=0, eos_token_id=0)),
    }


def _logits(model, tokens) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per architecture: HF dir, kdtrain checkpoint dir, HF logits on fixed tokens."""
    from kdtrain.convert.hf_import import import_hf

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, S))
    out = {"tokens": tokens, "root": root, "archs": {}}
    for name, make in _hf_models().items():
        model = make()
        with torch.no_grad():  # non-trivial norms and biases (HF initialises them to ones/zeros)
            for pname, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(1.0 if "norm" in pname or "ln_" in pname else 0.0, 0.1)
        hf_dir = root / f"hf_{name}"
        # The Llama model is written as sharded safetensors with an index.
        model.save_pretrained(hf_dir, max_shard_size="100KB" if name == "llama" else "5GB")
        cfg, _ = import_hf(hf_dir, root / f"kd_{name}", name=f"tiny-{name}")
        out["archs"][name] = {"hf": hf_dir, "kd": root / f"kd_{name}", "logits": _logits(model, tokens), "cfg": cfg}
    return out


def test_sharded_index_is_read(converted):
    assert (converted["archs"]["llama"]["hf"] / "model.safetensors.index.json").is_file()


def test_imported_names_and_shapes_match_the_kdtrain_model(converted):
    """The converter's expected layout equals what build_gpt creates (see also the TP tests)."""
    from kdtrain.convert.layout import expected_shapes
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.step_dirs import latest_checkpoint

    for name, a in converted["archs"].items():
        reader = CheckpointReader(latest_checkpoint(a["kd"]))
        assert reader.names() == set(expected_shapes(a["cfg"])), name
        assert reader.meta["model"]["name"] == f"tiny-{name}"


def _gather_vocab(logits_SBVl, tp_group, vocab):
    import torch.distributed as dist

    parts = [torch.empty_like(logits_SBVl) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits_SBVl.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :vocab].transpose(0, 1)  # [b, s, V]


def _layouts_worker(rank, world, archs, tokens, resave_root):
    """TP=1 (each rank alone), TP=2 and PP=2 forward of every imported model vs the HF logits."""
    import torch.distributed as dist

    from kdtrain.config import OptimizerConfig, load_model_config, to_dict
    from kdtrain.training.pretrain import build_trainable
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.convert.hf_weights import HFWeights
    from kdtrain.training.checkpoint import CheckpointReader, save_checkpoint
    from kdtrain.training.checkpoint_load import check_checkpoint_model, load_weights
    from kdtrain.training.step_dirs import latest_checkpoint

    layouts = {"tp1": [build_role_groups(RoleLayout("solo0", 0, 1, 1, 1)),
                       build_role_groups(RoleLayout("solo1", 1, 1, 1, 1))][rank],
               "tp2": build_role_groups(RoleLayout("tp2", 0, 2, 1, 1)),
               "pp2": build_role_groups(RoleLayout("pp2", 0, 1, 2, 1))}
    dp2 = build_role_groups(RoleLayout("dp2", 0, 1, 1, 2))
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    errors = {}
    for name, (kd_dir, hf_dir, ref) in archs.items():
        cfg = load_model_config(str(kd_dir / "model.yaml"))
        reader = CheckpointReader(latest_checkpoint(kd_dir))
        check_checkpoint_model(reader, cfg)
        # Every layout twice: from the converted checkpoint, and straight from the HF directory
        # (each rank converting only its own stage's tensors and slicing its TP part).
        for lname, groups in [(f"{s}/{lay}", g) for lay, g in layouts.items() for s in ("kd", "hf")]:
            model = build_gpt(cfg, groups, device=torch.device("cpu"), dtype=torch.float32, seed=123)
            params = [(model.param_specs[n], p) for n, p in model.named_parameters()]
            if lname.startswith("hf/"):
                hf_reader = HFWeights(hf_dir, cfg, "teacher")
                load_weights(hf_reader, params)
                # A rank reads exactly the slices it holds (its stage's layers, its tensor-parallel
                # rows or columns), except GPT-2's Conv1D QKV, converted whole and then sliced.
                held = {spec.global_name + str(spec.tied_copy): sum(g1 - g0 for g0, g1, _ in spec.ranges())
                        * p.numel() // p.shape[spec.dim] if spec.shard_dim is not None else p.numel()
                        for spec, p in params}
                own = sum(held.values())
                whole_qkv = sum(math.prod(spec.global_shape) - held[spec.global_name + str(spec.tied_copy)]
                                for spec, _ in params if ".linear_qkv." in spec.global_name)
                read = hf_reader.hf.elements_read
                errors[f"{name}/{lname}/read"] = read / cfg.num_params()
                extra = whole_qkv if name == "gpt2" else 0
                assert own <= read <= own + extra, f"{name} {lname}: read {read} elements, the rank holds {own}"
            else:
                load_weights(reader, params)
            model.eval()
            with torch.no_grad():
                if lname.endswith("pp2"):  # stage 0 -> hidden states -> stage 1 -> logits
                    if groups.pp_rank == 0:
                        dist.send(model(tokens, pos, None).contiguous(), 1)
                        continue
                    hidden = torch.empty(S, B, cfg.hidden_size)
                    dist.recv(hidden, 0)
                    model.set_input_tensor(hidden)
                    logits = model(tokens, pos, None).transpose(0, 1)[..., :cfg.vocab_size]
                else:
                    logits = _gather_vocab(model(tokens, pos, None), groups.pgc.tp, cfg.vocab_size)
            err = (logits - ref).abs().max().item()
            errors[f"{name}/{lname}"] = err
            assert err <= ATOL, f"{name} {lname}: max |kdtrain - HF| = {err:.2e} > {ATOL}"
            if lname == "kd/tp2":  # re-save from TP=2 (sharded pieces, padded vocab) for the export test
                meta = {"model": to_dict(cfg), "layout": {"tp": 2, "pp": 1, "dp": 1, "rank_offset": 0}}
                save_checkpoint(resave_root / name, 1, params, None, 0, groups.role_group, 0, meta, keep=1)
        # Re-saved by a distributed optimizer over 2 replicas: each writes the flat elements of its
        # chunk of the parameters (pieces cutting parameters), for the export test.
        role = build_trainable(cfg, dp2, OptimizerConfig(distributed=True), S, B, torch.device("cpu"),
                               torch.float32, seed=5)
        load_weights(reader, role.params, role.optimizer.separate_masters())
        meta = {"model": to_dict(cfg), "layout": {"tp": 1, "pp": 1, "dp": 2, "rank_offset": 0}}
        save_checkpoint(resave_root.parent / "resaved_zero" / name, 1, role.params, role.optimizer, dp2.dp_rank,
                        dp2.role_group, 0, meta, keep=1)
    print(f"rank {rank} max abs logit errors: {json.dumps(errors)}")


@pytest.fixture(scope="module")
def resaved_tp2(converted, tmp_path_factory):
    """Every layout's logits checked against HF's (in the workers), and each model re-saved from
    TP=2 (sharded pieces, padded vocabulary): the directory of those checkpoints."""
    archs = {n: (a["kd"], a["hf"], a["logits"]) for n, a in converted["archs"].items()}
    out = converted["root"] / "resaved_tp2"
    run_spawn(2, _layouts_worker, archs, converted["tokens"], out, tmp_path=tmp_path_factory.mktemp("tp2"))
    return out


def test_logits_match_hf_tp1_tp2_pp2(resaved_tp2, converted):
    assert sorted(p.name for p in resaved_tp2.iterdir()) == sorted(converted["archs"])


def _assert_same_hf(src_dir, dst_dir, tokens, exact_logits=True):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a_files = sorted(p.name for p in src_dir.glob("*.safetensors"))
    a = {}
    for f in a_files:
        a.update(load_file(src_dir / f))
    b = load_file(dst_dir / "model.safetensors")
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = _logits(AutoModelForCausalLM.from_pretrained(src_dir), tokens)
    lb = _logits(AutoModelForCausalLM.from_pretrained(dst_dir), tokens)
    assert torch.equal(la, lb) if exact_logits else torch.allclose(la, lb, atol=ATOL)


def test_round_trip_hf_kdtrain_hf(converted, tmp_path):
    from kdtrain.convert.hf_export import export_hf

    for name, a in converted["archs"].items():
        out = export_hf(a["kd"], tmp_path / f"back_{name}", model=str(a["kd"] / "model.yaml"))
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["vocab_size"] == VOCAB and cfg["architectures"] == json.loads(
            (a["hf"] / "config.json").read_text())["architectures"]
        _assert_same_hf(a["hf"], out, converted["tokens"])
        # The end tokens survive (generate stops where the source model stopped), and the
        # generation defaults come along.
        src, back = (transformers.AutoConfig.from_pretrained(d) for d in (a["hf"], out))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            assert getattr(back, key) == getattr(src, key), (name, key)
        if (a["hf"] / "generation_config.json").is_file():
            gen = transformers.GenerationConfig.from_pretrained(out)
            assert gen.to_dict() == transformers.GenerationConfig.from_pretrained(a["hf"]).to_dict(), name
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back_llama").eos_token_id == 0


def test_export_from_tp2_checkpoint(resaved_tp2, converted, tmp_path):
    from kdtrain.convert.hf_export import export_hf

    for name, a in converted["archs"].items():
        out = export_hf(resaved_tp2 / name, tmp_path / f"from_tp2_{name}")  # model config from the checkpoint
        _assert_same_hf(a["hf"], out, converted["tokens"])


def test_export_from_a_distributed_optimizer_checkpoint(resaved_tp2, converted, tmp_path):
    """A student trained with ``optimizer.distributed`` is saved as each replica's chunk of the flat
    parameter order (pieces holding flat parts of parameters): the export reassembles the same
    Hugging Face tensors."""
    from kdtrain.convert.hf_export import export_hf

    for name, a in converted["archs"].items():
        ckpt = resaved_tp2.parent / "resaved_zero" / name
        index = json.loads((ckpt / "step_0000001" / "meta.json").read_text())["shard_index"]
        assert len(index) == 2 and any("flat" in h for f in index.values() for h in f.values()), name
        out = export_hf(ckpt, tmp_path / f"from_zero_{name}")
        _assert_same_hf(a["hf"], out, converted["tokens"])


def test_cli_round_trip(converted, tmp_path):
    from kdtrain.cli import main

    a = converted["archs"]["qwen2"]
    assert main(["convert", "hf-to-kdtrain", "--hf", str(a["hf"]), "--out", str(tmp_path / "kd"),
                 "--name", "q"]) == 0
    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(tmp_path / "kd"), "--model",
                 str(tmp_path / "kd" / "model.yaml"), "--out", str(tmp_path / "hf"), "--arch", "qwen2"]) == 0
    _assert_same_hf(a["hf"], tmp_path / "hf", converted["tokens"])
    assert main(["convert", "hf-to-kdtrain", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def _copy_hf(src, dst, edit_config=None, drop=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        cfg.update(edit_config)
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(src / "model.safetensors")
    if drop:
        del tensors[drop]
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_import_errors_name_the_culprit(converted, tmp_path):
    from kdtrain.convert.hf_import import import_hf

    src = converted["archs"]["qwen2"]["hf"]
    bad = _copy_hf(src, tmp_path / "arch", {"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        import_hf(bad, tmp_path / "o1")
    bad = _copy_hf(src, tmp_path / "missing", drop="model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        import_hf(bad, tmp_path / "o2")
    bad = _copy_hf(src, tmp_path / "shape", {"intermediate_size": 128})
    with pytest.raises(ValueError, match=r"mlp\.linear_fc[12]\.weight.*shape"):
        import_hf(bad, tmp_path / "o3")
    bad = _copy_hf(src, tmp_path / "rope", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="yarn"):
        import_hf(bad, tmp_path / "o4")
    with pytest.raises(ValueError, match="config.json"):
        import_hf(tmp_path, tmp_path / "o5")
    q3 = converted["archs"]["qwen3"]["hf"]
    bad = _copy_hf(q3, tmp_path / "q3bias", {"attention_bias": True})
    with pytest.raises(ValueError, match="attention_bias=true is not supported for Qwen3ForCausalLM"):
        import_hf(bad, tmp_path / "o6")
    bad = _copy_hf(q3, tmp_path / "q3swa", {"layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="sliding-window layers"):
        import_hf(bad, tmp_path / "o7")
    # A key/value head count the weights do not have: the fused tensor's parts are named before
    # they are fused (and nothing is left in the new output directory).
    bad = _copy_hf(src, tmp_path / "kv", {"num_key_value_heads": 4})
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(32, 64\), config.json implies \(64, 64\)"):
        import_hf(bad, tmp_path / "o8")
    assert not (tmp_path / "o8").exists()
    bad = _copy_hf(src, tmp_path / "nofactor", {"rope_scaling": {"rope_type": "llama3"}, "rope_parameters": None})
    with pytest.raises(ValueError, match="needs its scaling 'factor'"):
        import_hf(bad, tmp_path / "o9")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="afile: exists and is not a directory"):
        import_hf(src, tmp_path / "afile")


def test_vocab_trim_and_export_config_checks(converted, tmp_path):
    from kdtrain.convert.hf_config import hf_config_from_model
    from kdtrain.convert.hf_import import import_hf

    a = converted["archs"]["llama"]
    cfg, _ = import_hf(a["hf"], tmp_path / "trim", vocab_size=300)
    assert cfg.vocab_size == 300
    with pytest.raises(ValueError, match="vocab-size"):
        import_hf(a["hf"], tmp_path / "trim2", vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="add_qkv_bias"):
        hf_config_from_model(converted["archs"]["qwen2"]["cfg"], "llama")
    with pytest.raises(ValueError, match="normalization"):
        hf_config_from_model(converted["archs"]["llama"]["cfg"], "gpt2")
    # Query/key norms exist in Qwen3 only; a Qwen3 model exports as Qwen3 by default.
    q3 = converted["archs"]["qwen3"]["cfg"]
    with pytest.raises(ValueError, match="qk_layernorm=True cannot be exported as LlamaForCausalLM"):
        hf_config_from_model(q3, "llama")
    with pytest.raises(ValueError, match="qk_layernorm=False cannot be exported as Qwen3ForCausalLM"):
        hf_config_from_model(converted["archs"]["llama"]["cfg"], "qwen3")
    exported = hf_config_from_model(q3)
    assert exported["architectures"] == ["Qwen3ForCausalLM"] and exported["head_dim"] == 24


def test_export_checks_before_writing_and_replaces_an_earlier_export(converted, tmp_path):
    """A refused export leaves no directory behind; an export into an earlier one's directory
    leaves none of that model's tokenizer or generation files; Qwen3's head_dim default."""
    from kdtrain.convert.hf_config import model_config_from_hf
    from kdtrain.convert.hf_export import export_hf

    qwen2 = converted["archs"]["qwen2"]
    with pytest.raises(ValueError, match="add_qkv_bias without add_bias_linear"):
        export_hf(qwen2["kd"], tmp_path / "refused", arch="llama")
    assert not (tmp_path / "refused").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="--out .*afile: exists and is not a directory"):
        export_hf(qwen2["kd"], tmp_path / "afile")
    # Another model's directory (the teacher's, a mistyped --out) is not replaced.
    teacher = _copy_hf(qwen2["hf"], tmp_path / "teacher")
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    with pytest.raises(ValueError, match=r"--out .*teacher holds files \(config.json, model.safetensors\) but no "
                                         r"kdtrain_export.json"):
        export_hf(converted["archs"]["llama"]["kd"], teacher)
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before
    # Without safetensors installed (the base install): an error naming the package and the extra.
    import sys

    from unittest import mock

    with mock.patch.dict(sys.modules, {"safetensors": None, "safetensors.torch": None}):
        with pytest.raises(ValueError, match=r"needs the `safetensors` package, which is not installed .*\[hf\]"):
            export_hf(qwen2["kd"], tmp_path / "no_safetensors")
    out = export_hf(converted["archs"]["llama"]["kd"], tmp_path / "reused")
    assert (out / "generation_config.json").is_file()
    (out / "tokenizer.json").write_text("{}")  # as if an earlier export had written another tokenizer
    (out / "README.md").write_text("notes")  # not an export's file: kept
    # Interrupted once all weights are written (a kill while the files took their names left a
    # mix of the two exports): the earlier export stays as it was, and nothing beside it.
    import kdtrain.convert.hf_export as hf_export

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_write = hf_export._write_json

    def interrupted(path, value):
        if path.name == "config.json":
            raise KeyboardInterrupt
        real_write(path, value)

    hf_export._write_json = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            export_hf(qwen2["kd"], out, tokenizer=None)
    finally:
        hf_export._write_json = real_write
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    export_hf(qwen2["kd"], out, tokenizer=None)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "kdtrain_export.json", "model.safetensors"]
    assert (json.loads((out / "generation_config.json").read_text())
            == json.loads((qwen2["hf"] / "generation_config.json").read_text()))  # Qwen2's, not Llama's
    # --dtype auto: the source's dtype for an imported checkpoint, the run's precision for a trained
    # one (recorded with its checkpoints), else fp32.
    from kdtrain.convert.hf_export import auto_dtype

    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"  # the fp32 source
    assert auto_dtype({"dtype": "bfloat16", "source": {"dtype": "float32"}}) == "bf16"
    assert auto_dtype({"source": {"dtype": "float16"}}) == "fp16" and auto_dtype({}) == "fp32"
    bf16 = tmp_path / "hf_bf16"
    transformers.AutoModelForCausalLM.from_pretrained(qwen2["hf"], dtype=torch.bfloat16).save_pretrained(bf16)
    from kdtrain.convert.hf_import import import_hf

    import_hf(bf16, tmp_path / "kd_bf16")
    back = export_hf(tmp_path / "kd_bf16", tmp_path / "back_bf16")
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    src, got = load_file(bf16 / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], src[k]) for k in src)  # bit for bit
    # Qwen3 config files may leave head_dim out: transformers then uses 128, not hidden / heads.
    hf = json.loads((converted["archs"]["qwen3"]["hf"] / "config.json").read_text())
    del hf["head_dim"]
    assert model_config_from_hf(hf, "q3")[0].kv_channels == 128


# ---- Hugging Face directories used as they are, and large-model conversion -----------------------
def test_model_config_from_hf_dir_equals_the_imported_one(converted):
    import dataclasses

    from kdtrain.config import load_model_config

    for name, a in converted["archs"].items():
        direct = load_model_config(str(a["hf"]))
        assert direct.name == f"hf_{name}"
        assert dataclasses.replace(direct, name=a["cfg"].name) == a["cfg"], name


def test_hf_model_reference_takes_overrides(converted):
    """A run names a Hugging Face directory as its model and still overrides fields (the padded
    vocabulary down to the tokenizer's ids), on the command line or as ``{hf: DIR, ...}``."""
    import dataclasses

    from kdtrain.config import load_model_config
    from kdtrain.config.distill import load_distill_config

    hf = str(converted["archs"]["qwen2"]["hf"])
    cfg = load_distill_config("tiny", [f"teacher.model={hf}", "teacher.model.vocab_size=300", f"student.model={hf}",
                                       "student.model.vocab_size=300", "data.mock=true"])
    base = load_model_config(hf)
    assert cfg.teacher.model == dataclasses.replace(base, vocab_size=300)
    assert load_model_config({"hf": hf, "vocab_size": 300, "name": "q"}) == dataclasses.replace(
        base, vocab_size=300, name="q")
    with pytest.raises(ValueError, match="num_layers"):
        load_model_config({"hf": hf, "num_layers": 0})
    with pytest.raises(ValueError, match="teacher.model.vocab_size=N student.model.vocab_size=N"):
        load_distill_config("tiny", [f"teacher.model={hf}", "data.mock=true"]).validate(1)


def _tp1_model(cfg):
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups

    model = build_gpt(cfg, build_role_groups(RoleLayout("solo", 0, 1, 1, 1)), device=torch.device("cpu"),
                      dtype=torch.float32, seed=5).eval()
    return model, [(model.param_specs[n], p) for n, p in model.named_parameters()]


def test_hf_load_checks_the_run_model(converted, world_of_one):
    """A run's own model YAML may go with a Hugging Face ``load``: training-only fields and the
    longest RoPE sequence may differ, a smaller vocabulary trims the (padded) table; anything that
    changes the network is an error naming the field, before any weight is read."""
    import dataclasses

    from kdtrain.training.checkpoint_load import load_model_weights

    a = converted["archs"]["llama"]
    cfg = dataclasses.replace(a["cfg"], name="mine", init_std=0.5, hidden_dropout=0.1, max_seq_length=256,
                              vocab_size=VOCAB - 45)
    model, params = _tp1_model(cfg)
    load_model_weights(a["hf"], cfg, params, "student")
    tokens = converted["tokens"] % cfg.vocab_size
    from transformers import AutoModelForCausalLM

    ref = _logits(AutoModelForCausalLM.from_pretrained(a["hf"]), tokens)[..., :cfg.vocab_size]
    with torch.no_grad():
        got = model(tokens, torch.arange(S).unsqueeze(0).expand(B, S), None).transpose(0, 1)[..., :cfg.vocab_size]
    assert (got - ref).abs().max().item() <= ATOL
    for field, value in (("norm_epsilon", 1e-6), ("rope_theta", 10000.0), ("tie_embeddings", True)):
        bad = dataclasses.replace(a["cfg"], **{field: value})
        with pytest.raises(ValueError, match=f"student.load: .*{field}"):
            load_model_weights(a["hf"], bad, _tp1_model(bad)[1], "student")
    big = dataclasses.replace(a["cfg"], vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match=f"has {VOCAB} vocabulary rows"):
        load_model_weights(a["hf"], big, _tp1_model(big)[1], "teacher")
    with pytest.raises(ValueError, match="teacher.load: .*does not exist"):
        load_model_weights(a["hf"].parent / "nowhere", a["cfg"], params, "teacher")


def test_streaming_import_bounded_shards(converted, tmp_path):
    """With a small shard size the import writes several shard files, none much over the bound
    (one parameter at most past it), holding exactly the tensors of the one-file import."""
    from kdtrain.convert.hf_import import import_hf
    from kdtrain.training.checkpoint import CheckpointReader
    from kdtrain.training.step_dirs import latest_checkpoint

    for name in ("llama", "gpt2"):
        a = converted["archs"][name]
        bound = 40_000
        import_hf(a["hf"], tmp_path / name, name=f"tiny-{name}", shard_bytes=bound)
        step = latest_checkpoint(tmp_path / name)
        files = sorted((step / "shards").glob("*.pt"))
        whole, parts = CheckpointReader(latest_checkpoint(a["kd"])), CheckpointReader(step)
        biggest = max(p[0]["param"].numel() * 4 for p in whole.pieces.values())
        assert len(files) >= 3, (name, len(files))
        for f in files:
            data = torch.load(f, weights_only=True)["pieces"]
            assert sum(p["param"].numel() * p["param"].element_size() for p in data.values()) < bound + biggest
        assert parts.names() == whole.names()
        for key in whole.names():
            assert torch.equal(parts.pieces[key][0]["param"], whole.pieces[key][0]["param"]), key
        assert not list(tmp_path.glob(f"{name}/*.tmp"))
    (tmp_path / "llama" / "step_0000100").mkdir()  # a run's checkpoint: never pruned by a conversion
    with pytest.raises(ValueError, match="holds other checkpoints"):
        import_hf(converted["archs"]["llama"]["hf"], tmp_path / "llama")


def test_sharded_export_loads_in_transformers(converted, tmp_path):
    """Past the shard size the export writes numbered safetensors files and the index, which
    transformers loads into the same model; a re-export with one file removes the old split."""
    from kdtrain.convert.hf_export import export_hf

    a = converted["archs"]["qwen3"]
    out = export_hf(a["kd"], tmp_path / "split", shard_bytes=30_000, tokenizer=None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    assert not list(out.glob("*.tmp"))
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = load_file(a["hf"] / "model.safetensors")
    got = {}
    for f in files:
        got.update(load_file(out / f))
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    ref = _logits(AutoModelForCausalLM.from_pretrained(a["hf"]), converted["tokens"])
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), converted["tokens"]), ref)
    export_hf(a["kd"], out, tokenizer=None)  # one file now
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_documents_in_one_window_match_hf_on_each_alone(converted, world_of_one, arch):
    """data.attention: documents: documents packed into one window (DocumentMask) get, each, the
    logits Hugging Face computes for that document alone (llama3 rope scaling, QKV bias, query/key
    norms, learned positions)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from kdtrain.data.gpt_dataset import positions_from_starts
    from kdtrain.models.documents import DocumentMask
    from kdtrain.training.checkpoint_load import load_model_weights

    a = converted["archs"][arch]
    model, params = _tp1_model(a["cfg"])
    load_model_weights(a["hf"], a["cfg"], params, "teacher")
    hf = AutoModelForCausalLM.from_pretrained(a["hf"])
    lengths = [[3, 9, 4], [S]]
    tokens = converted["tokens"]
    pos = torch.tensor(np.stack([positions_from_starts(S, np.cumsum(row)[:-1]) for row in lengths]))
    with torch.no_grad():
        got = model(tokens, pos, DocumentMask(pos)).transpose(0, 1)[..., :VOCAB]
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            ref = _logits(hf, tokens[b:b + 1, at:at + n])[0]
            assert (got[b, at:at + n] - ref).abs().max().item() <= ATOL, (arch, b, at)
            at += n


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path, capsys):
    """A config.json holding a list (or any non-object) is an error naming the file, not an
    AttributeError from deep inside the converter."""
    from kdtrain.cli import main
    from kdtrain.convert.hf_weights import HFModel

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('[{"architectures": ["LlamaForCausalLM"]}]')
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"hf/config\.json: not a JSON object .*holds an array"):
        HFModel(tmp_path / "hf")
    assert main(["convert", "hf-to-kdtrain", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "kd")]) == 2
    assert f"{tmp_path / 'hf' / 'config.json'}: not a JSON object" in capsys.readouterr().err


def test_out_below_a_file_is_refused_before_the_weights_are_read(converted, tmp_path, capsys, monkeypatch):
    """Both directions check that --out can be created before reading any weights."""
    from kdtrain.cli import main
    from kdtrain.convert import hf_weights
    from kdtrain.training import checkpoint

    def no_reading(*args, **kwargs):
        raise AssertionError("weights read before --out was checked")

    monkeypatch.setattr(hf_weights.HFModel, "tensor", no_reading)
    monkeypatch.setattr(checkpoint.CheckpointReader, "read_into", no_reading)
    a = converted["archs"]["qwen2"]
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile" / "sub" / "deeper"):
        for cmd in (["hf-to-kdtrain", "--hf", str(a["hf"])], ["kdtrain-to-hf", "--ckpt", str(a["kd"])]):
            assert main(["convert", *cmd, "--out", str(out)]) == 2, (cmd, out)
            err = capsys.readouterr().err
            assert f"error: --out {out}: cannot create the directory, {tmp_path / 'afile'} is not a directory" in err
    assert main(["convert", "hf-to-kdtrain", "--hf", str(a["hf"]), "--out", str(tmp_path / "afile")]) == 2
    assert "--out" in capsys.readouterr().err and (tmp_path / "afile").is_file()


def test_non_finite_weights_are_refused_naming_the_tensor(converted, tmp_path, capsys):
    """NaN or infinity in a source tensor is refused when it is converted (whole, or the part of a
    fused tensor one rank reads), naming the Hugging Face tensor; nothing is written. Vocabulary
    rows trimmed away do not count."""
    from safetensors.torch import load_file, save_file

    from kdtrain.cli import main
    from kdtrain.convert.hf_import import import_hf
    from kdtrain.convert.hf_weights import HFModel

    src = converted["archs"]["qwen2"]["hf"]
    qkv = "decoder.layers.1.self_attention.linear_qkv.weight"
    # (source tensor, entry, value, kdtrain tensor, the rows of it one rank reads: query group 0)
    cases = (("model.layers.1.self_attn.k_proj.weight", (3, 5), float("inf"), qkv, 64),
             ("model.norm.weight", (7,), float("nan"), "decoder.final_layernorm.weight", 32),
             ("model.embed_tokens.weight", (VOCAB - 1, 2), float("-inf"), "embedding.word_embeddings.weight", VOCAB))
    for i, (hf_name, where, value, kd_name, rows) in enumerate(cases):
        bad = _copy_hf(src, tmp_path / f"bad{i}")
        tensors = load_file(bad / "model.safetensors")
        tensors[hf_name][where] = value
        save_file(tensors, str(bad / "model.safetensors"))
        out = tmp_path / f"out{i}"
        assert main(["convert", "hf-to-kdtrain", "--hf", str(bad), "--out", str(out)]) == 2
        assert f"tensor {hf_name} (kdtrain {kd_name}) holds NaN or infinite values" in capsys.readouterr().err
        assert not out.exists()
        with pytest.raises(ValueError, match=f"tensor {hf_name} holds NaN or infinite values"):
            HFModel(bad).part(kd_name, 0, 0, rows)
    # The last vocabulary row is padding once the table is trimmed: the rest converts.
    cfg, _ = import_hf(tmp_path / "bad2", tmp_path / "trimmed", vocab_size=VOCAB - 1)
    assert cfg.vocab_size == VOCAB - 1
