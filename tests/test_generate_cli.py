"""``kdtrain generate`` on a Hugging Face chat model read straight from its directory: greedy
replies are the tokens ``transformers``' own greedy ``generate`` produces from the same chat
prompt (fp32 on CPU), prompts of different lengths decode together, a reply stops at an end token,
and bad arguments are clear errors."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from conftest import pretend_transformer_engine  # noqa: E402
from kdtrain.data import build_demo_corpus, iter_documents  # noqa: E402

EOS = "<|im_end|>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PROMPTS = ["What does zip do?", "Explain os.path.join, please, in one short sentence."]


@pytest.fixture(scope="module")
def hf_chat_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("gen")
    build_demo_corpus(str(root / "text.jsonl"), max_documents=30)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(iter_documents(str(root / "text.jsonl")), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False))
    model.save_pretrained(root / "hf")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tok.chat_template = CHATML
    tok.save_pretrained(root / "hf")
    return root / "hf", model.eval(), tok


def test_greedy_chat_replies_equal_transformers_generate(hf_chat_model, world_of_one, monkeypatch):
    """Greedy replies are transformers' own, sampling is reproducible by seed; kdtrain's local
    layers are used where Transformer Engine imports too (their key/value-cached decoder)."""
    from kdtrain.generate.cli import generate

    pretend_transformer_engine(monkeypatch)
    folder, model, tok = hf_chat_model
    got = generate(str(folder), PROMPTS, chat=True, max_new_tokens=12, device="cpu")
    for prompt, g in zip(PROMPTS, got):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        assert g["ids"] == ref, (prompt, g["ids"], ref)
        assert g["stopped"] == (ref[-1] == tok.eos_token_id) and g["text"] == tok.decode(ref)
    # Plain continuation (no template), and sampling is reproducible by seed.
    plain = generate(str(folder), ["def f(x):"], max_new_tokens=6, device="cpu")[0]
    ids = torch.tensor([tok("def f(x):", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert plain["ids"] == ref
    a, b = (generate(str(folder), PROMPTS, chat=True, temperature=1.0, seed=s, max_new_tokens=8, device="cpu")
            for s in (3, 3))
    assert a == b
    # Sampling among the single most likely token is greedy decoding.
    top1 = generate(str(folder), PROMPTS, chat=True, temperature=1.0, top_k=1, seed=3, max_new_tokens=12,
                    device="cpu")
    assert [r["ids"] for r in top1] == [r["ids"] for r in got]


def test_cli_output_and_errors(hf_chat_model, capsys, tmp_path):
    from kdtrain.cli import main

    folder, _, _ = hf_chat_model
    assert main(["generate", "--model", str(folder), "--chat", "--prompt", PROMPTS[0], "--max-new-tokens", "4",
                 "--json", "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["prompt"] == PROMPTS[0] and 1 <= len(rec["ids"]) <= 4
    for args, msg in ((["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                      (["--max-new-tokens", "500"], "exceed the model's max_seq_length 128"),
                      (["--temperature", "-1"], "--temperature must be a number >= 0"),
                      (["--temperature", "nan"], "--temperature must be a number >= 0"),
                      (["--top-p", "nan"], "--top-p in (0, 1]"),
                      (["--top-p", "0"], "--top-p in (0, 1]"),
                      (["--cuda-graphs"], "--cuda-graphs: CUDA graphs need a CUDA device"),
                      (["--prompts-file", str(tmp_path / "none.txt")],
                       f"--prompts-file {tmp_path / 'none.txt'}: cannot read it")):
        assert main(["generate", "--model", str(folder), "--prompt", "x", "--device", "cpu", *args]) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_reply_stops_at_any_end_token_the_model_names(hf_chat_model, tmp_path, world_of_one):
    """Llama-3-Instruct-style: generation_config.json lists end tokens besides the tokenizer's EOS.
    A reply stops at the first of them, as transformers' generate (reading the same file) does, for
    the Hugging Face directory and for a kdtrain checkpoint imported from it."""
    import shutil

    from kdtrain.convert.hf_import import import_hf
    from kdtrain.generate.cli import end_tokens, generate

    folder, model, tok = hf_chat_model
    free = generate(str(folder), PROMPTS[:1], chat=True, max_new_tokens=12, device="cpu")[0]["ids"]
    other = next(i for i in free if i != tok.eos_token_id)  # a token the greedy reply writes
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, other]}))
    imported = tmp_path / "ckpt"
    import_hf(hf, imported)
    for where in (hf, imported):
        want = list(dict.fromkeys([tok.eos_token_id, other, model.config.eos_token_id]))
        assert end_tokens(str(where), type("T", (), {"eos_id": tok.eos_token_id})()) == want
        got = generate(str(where), PROMPTS[:1], chat=True, max_new_tokens=12, device="cpu", tokenizer=str(folder))[0]
        assert got["ids"] == free[:free.index(other) + 1] and got["stopped"], (got, free)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    config = transformers.GenerationConfig.from_pretrained(hf)
    with torch.no_grad():
        ref = model.generate(ids, generation_config=config, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert ref == got["ids"]


def test_a_plain_prompt_starts_with_bos_as_the_tokenizer_s_convention_says(hf_chat_model, tmp_path, world_of_one):
    """A Llama-3-style tokenizer puts BOS before every text: a plain prompt gets it, as transformers'
    default call gives it (and as preprocessing wrote the corpus); --no-prepend-bos leaves it out."""
    import shutil

    from tokenizers import Tokenizer, processors

    from kdtrain.generate.cli import generate

    folder, model, tok = hf_chat_model
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bpe.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", bpe.token_to_id("<|endoftext|>"))])
    bpe.save(str(hf / "tokenizer.json"))
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|endoftext|>"}))
    ref_tok = transformers.AutoTokenizer.from_pretrained(hf)
    refs = {}
    for prepend, ids in ((None, ref_tok("def f(x):")["input_ids"]),
                         (False, ref_tok("def f(x):", add_special_tokens=False)["input_ids"])):
        assert (ids[0] == ref_tok.bos_token_id) == (prepend is None)
        with torch.no_grad():
            refs[prepend] = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                           max_length=None)[0, len(ids):].tolist()
    assert refs[None] != refs[False]  # the start token changes this model's greedy continuation
    for prepend, ref in refs.items():
        assert generate(str(hf), ["def f(x):"], max_new_tokens=20, device="cpu", prepend_bos=prepend)[0]["ids"] == ref
    with pytest.raises(ValueError, match="--prepend-bos / --no-prepend-bos apply to plain prompts"):
        generate(str(hf), ["x"], chat=True, device="cpu", prepend_bos=True)


def test_a_checkpoint_refuses_a_tokenizer_other_than_its_runs(tiny_corpus, tmp_path, capsys, world_of_one):
    """A kdtrain checkpoint records the fingerprint of the tokenizer its ids came from: generate
    refuses another one (here one with fewer ids, which a vocabulary-size check lets through), as
    --tokenizer or as the run's data.tokenizer rewritten since, naming both."""
    import shutil

    from kdtrain.cli import main
    from kdtrain.config import load_pretrain_config
    from kdtrain.data import train_tokenizer
    from kdtrain.data.tokenizer import Tokenizer
    from kdtrain.training.pretrain import pretrain

    run_tok = tmp_path / "run.model"
    shutil.copy(tiny_corpus["tokenizer"], run_tok)
    pretrain(load_pretrain_config("tiny", [
        f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={run_tok}", "precision.device=cpu",
        "training.train_steps=1", f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    other = train_tokenizer([str(tiny_corpus["corpus"])], str(tmp_path / "other"), vocab_size=300)
    theirs, ours = Tokenizer(str(run_tok)).fingerprint, Tokenizer(other).fingerprint
    base = ["generate", "--model", str(tmp_path / "ckpt"), "--prompt", "def f", "--max-new-tokens", "2",
            "--device", "cpu"]
    for args in ([], ["--tokenizer", tiny_corpus["tokenizer"]]):  # the run's, by default and by another path
        assert main(base + args) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(base + ["--tokenizer", other]) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer {other} (fingerprint {ours}) is not the tokenizer of" in err
    assert f"trained on ids of tokenizer {theirs} ({run_tok})" in err
    shutil.copy(other, run_tok)  # the run's tokenizer file retrained in place
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"data.tokenizer {run_tok} has changed since" in err and ours in err and theirs in err
