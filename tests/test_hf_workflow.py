"""The Hugging Face user story end to end, at tiny scale on CPU: a Hugging Face chat teacher and
student (weights + the teacher's tokenizer with its chat template) -> conversations rendered and
tokenized with the teacher's template, replies as the targets ->
distillation with the teacher read straight from its Hugging Face directory (``model`` and
``load`` name it) and the student converted by ``kdtrain convert hf-to-kdtrain`` -> ``kdtrain
convert kdtrain-to-hf`` -> ``transformers`` loads the distilled student with its tokenizer, and
its logits are the kdtrain student's, and its chat template is the teacher's."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

from kdtrain.data import build_demo_corpus, encode_files, iter_documents  # noqa: E402

EOS = "<|endoftext|>"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _hf_pair(root):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    build_demo_corpus(str(root / "text.jsonl"), max_documents=60)
    corpus = root / "chats.jsonl"
    build_demo_corpus(str(corpus), max_documents=60, conversations=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(iter_documents(str(root / "text.jsonl")), trainers.BpeTrainer(
        vocab_size=384, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    common = dict(vocab_size=384, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, **common))
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, **common))
    teacher.save_pretrained(root / "hf_teacher")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)
    tok.chat_template = CHATML
    tok.save_pretrained(root / "hf_teacher")
    student.save_pretrained(root / "hf_student")
    return corpus, student


def test_hf_teacher_to_hf_student(world_of_one, tmp_path):
    from conftest import read_metrics
    from kdtrain.cli import main
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill

    corpus, student0 = _hf_pair(tmp_path)
    assert main(["convert", "hf-to-kdtrain", "--hf", str(tmp_path / "hf_student"),
                 "--out", str(tmp_path / "kd_student")]) == 0
    prefix = str(tmp_path / "text_document")
    assert encode_files([str(corpus)], str(tmp_path / "hf_teacher"), prefix, format="chat")["loss_mask"]
    distill(load_distill_config("tiny", [
        f"teacher.model={tmp_path / 'hf_teacher'}", f"teacher.load={tmp_path / 'hf_teacher'}",
        "teacher.random_init=false", f"student.model={tmp_path / 'kd_student' / 'model.yaml'}",
        f"student.load={tmp_path / 'kd_student'}", f"data.path=[{prefix}]",
        f"data.tokenizer={tmp_path / 'hf_teacher'}", "loss.divergence=jsd", "loss.tau=1.0", "training.train_steps=8",
        "precision.device=cpu", f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    losses = read_metrics(tmp_path / "run")
    kd = [losses[step]["kd_loss"] for step in range(1, 9)]
    assert sum(kd[-3:]) < 0.85 * sum(kd[:3]), kd  # learns (the last three steps at ~0.71 of the first three on CPU)

    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    teacher_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf_teacher")
    text = "def f(x):\n    return x + 1\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == teacher_tok(text, add_special_tokens=False)["input_ids"] and tok.eos_token == EOS
    conv = [{"role": "user", "content": "What does f do?"}, {"role": "assistant", "content": "It adds one."}]
    assert tok.apply_chat_template(conv, tokenize=False) == teacher_tok.apply_chat_template(conv, tokenize=False)
    assert "<|im_start|>assistant" in tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(model) is type(student0) and model.config.hidden_size == 32
    # It stops where the data's documents end (the teacher tokenizer's EOS), in the run's precision.
    assert model.config.eos_token_id == teacher_tok.eos_token_id is not None
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert json.loads(next((tmp_path / "ckpt").glob("step_*/meta.json")).read_text())["dtype"] == "float32"
    # The exported student is the distilled one: its logits are the kdtrain student's, not the
    # initial weights'.
    from kdtrain.config import load_model_config
    from kdtrain.models import build_gpt
    from kdtrain.parallel import RoleLayout, build_role_groups
    from kdtrain.training.checkpoint_load import load_model_weights

    cfg = load_model_config(str(tmp_path / "kd_student" / "model.yaml"))
    kd = build_gpt(cfg, build_role_groups(RoleLayout("student", 0, 1, 1, 1)), device=torch.device("cpu"),
                   dtype=torch.float32, seed=0).eval()
    load_model_weights(str(tmp_path / "ckpt"), cfg, [(kd.param_specs[n], p) for n, p in kd.named_parameters()],
                       "student")
    x = torch.tensor([ids])
    with torch.no_grad():
        hf_logits = model(x).logits[0]
        kd_logits = kd(x, torch.arange(x.shape[1]).unsqueeze(0), None)[:, 0, : cfg.vocab_size]
        before = student0.eval()(x).logits[0]
    torch.testing.assert_close(hf_logits, kd_logits.float(), rtol=1e-4, atol=1e-4)
    assert (hf_logits - before).abs().max() > 1e-3


def test_sentencepiece_run_to_hf_student(world_of_one, tiny_corpus, tmp_path):
    """The demo's path at tiny scale: a corpus tokenized with a SentencePiece model, a distill run
    naming it as data.tokenizer -> ``kdtrain convert kdtrain-to-hf`` without --tokenizer writes it
    as a Hugging Face tokenizer: ``AutoTokenizer`` gives the corpus' own ids for its documents, and
    the model's config and generation defaults end at the tokenizer's EOS."""
    import sentencepiece as spm

    from kdtrain.cli import main
    from kdtrain.config.distill import load_distill_config
    from kdtrain.data import open_indexed_dataset
    from kdtrain.training.distill import distill

    model = tiny_corpus["tokenizer"]
    distill(load_distill_config("tiny", [
        f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={model}", "training.train_steps=2",
        "precision.device=cpu", f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    out = tmp_path / "out"
    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    eos = spm.SentencePieceProcessor(model_file=model).eos_id()
    ds = open_indexed_dataset(tiny_corpus["prefix"])
    ends = ds.document_lengths.cumsum().tolist()
    for i, text in enumerate(list(iter_documents(str(tiny_corpus["corpus"])))[:6]):
        document = ds.tokens[ends[i] - ds.document_lengths[i]:ends[i]].tolist()
        assert tok(text)["input_ids"] + [tok.eos_token_id] == document
        assert tok.decode(document, skip_special_tokens=True) == text
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == tok.eos_token_id == eos
