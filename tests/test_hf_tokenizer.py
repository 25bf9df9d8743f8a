"""Hugging Face tokenizers (kdtrain/data/hf_tokenizer.py): a corpus is tokenized exactly as
``transformers`` tokenizes it, preprocessed into an indexed dataset that a run and a teacher cache
accept under the same ``data.tokenizer``, and bad tokenizer paths are clear errors.

The tokenizer is a byte-level BPE trained here on the demo corpus with the ``tokenizers`` library
and saved by ``transformers`` (tokenizer.json + tokenizer_config.json), the layout of a Hugging
Face model directory; no download."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from kdtrain.config import DataConfig, load_model_config  # noqa: E402
from kdtrain.data import Tokenizer, build_demo_corpus, encode_files, iter_documents, open_indexed_dataset  # noqa: E402

EOS = "<|endoftext|>"
SAMPLES = ["def f(x):\n    return x + 1\n", "  indented\n\tcode(x)  \n\n", "ünïcödé 漢字 😀 and <|endoftext|> as text"]


def _bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen style) trained on ``texts``."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = Backend(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_tok")
    jsonl = root / "corpus.jsonl"
    build_demo_corpus(str(jsonl), max_documents=30)
    texts = list(iter_documents(str(jsonl)))
    model_dir = root / "teacher-hf"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(texts, 400), eos_token=EOS)
    fast.save_pretrained(model_dir)
    return {"root": root, "jsonl": jsonl, "texts": texts, "dir": model_dir, "fast": fast}


def test_ids_equal_transformers_and_round_trip(hf):
    tok = Tokenizer(str(hf["dir"]))
    assert type(tok).__name__ == "HFTokenizer"
    reference = transformers.AutoTokenizer.from_pretrained(hf["dir"])
    assert tok.vocab_size == len(reference) and tok.vocab_size <= 400
    assert tok.eos_id == reference.convert_tokens_to_ids(EOS) and tok.bos_id == -1 and tok.pad_id == -1
    texts = SAMPLES + hf["texts"][:5]
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level BPE: lossless
        assert tok.decode(np.array(ids, dtype=np.uint16)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    # As in transformers, a special token's text inside a document is that token (its id), while no
    # template tokens are added: the EOS id appears only where the text spells it.
    assert tok.encode(SAMPLES[2]).count(tok.eos_id) == 1 and tok.eos_id not in tok.encode(SAMPLES[0])
    # The directory and its tokenizer.json are the same tokenizer; pickling re-opens it by path.
    by_file = Tokenizer(str(hf["dir"] / "tokenizer.json"))
    assert by_file.fingerprint == tok.fingerprint and by_file.encode(SAMPLES[0]) == tok.encode(SAMPLES[0])
    again = pickle.loads(pickle.dumps(tok))
    assert type(again) is type(tok) and again.encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_special_tokens_from_the_config_files(hf, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((hf["dir"] / "tokenizer.json").read_bytes())
    tok = Tokenizer(str(d))  # no config file: EOS found among the usual end-of-text tokens
    assert tok.eos_id == Tokenizer(str(hf["dir"])).eos_id and tok.bos_id == -1
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": EOS}, "pad_token": EOS}))
    tok = Tokenizer(str(d))
    assert tok.bos_id == tok.pad_id == tok.eos_id >= 0
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|im_end\|>' .* is not in its vocabulary"):
        Tokenizer(str(d))


def test_preprocess_and_the_run_accept_the_teacher_s_tokenizer(hf, tmp_path):
    from kdtrain.cache.manifest import tokenizer_identity
    from kdtrain.training.pretrain import open_dataset

    tok = Tokenizer(str(hf["dir"]))
    prefix = str(tmp_path / "text_document")
    meta = encode_files([str(hf["jsonl"])], str(hf["dir"]), prefix)
    assert meta["tokenizer_fingerprint"] == tok.fingerprint and meta["eos_id"] == tok.eos_id
    ds = open_indexed_dataset(prefix)
    want = [tok.encode(t) + [tok.eos_id] for t in hf["texts"]]
    assert ds.document_lengths.tolist() == [len(w) for w in want]
    assert ds.tokens.tolist() == [i for w in want for i in w]
    # Two worker processes (the tokenizer travels by path) write the same bytes.
    two = str(tmp_path / "two_workers")
    encode_files([str(hf["jsonl"])], str(hf["dir"]), two, workers=2)
    assert Path(f"{two}.bin").read_bytes() == Path(f"{prefix}.bin").read_bytes()

    model = load_model_config("tiny")
    assert tok.vocab_size <= model.vocab_size
    data = DataConfig(path=[prefix], tokenizer=str(hf["dir"]), seq_length=32)
    windows = open_dataset(data, model)
    assert len(windows.train_sample(0)) == 33
    assert tokenizer_identity(str(hf["dir"]))["fingerprint"] == tok.fingerprint
    # Another tokenizer than the one the dataset was built with is refused.
    from kdtrain.data import train_tokenizer

    spm = train_tokenizer([str(hf["jsonl"])], str(tmp_path / "spm"), vocab_size=320)
    with pytest.raises(ValueError, match=f"tokenizer mismatch .* records tokenizer fingerprint .*, but "
                                         f"data.tokenizer \\({re.escape(spm)}\\) has fingerprint"):
        open_dataset(DataConfig(path=[prefix], tokenizer=spm, seq_length=32), model)


def test_bad_tokenizer_paths_are_clear_errors(hf, tmp_path):
    empty = tmp_path / "model_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="directory without a tokenizer.json"):
        Tokenizer(str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        Tokenizer(str(bad))
    from kdtrain.cache.manifest import tokenizer_identity

    with pytest.raises(ValueError, match="data.tokenizer: .*directory without a tokenizer.json"):
        tokenizer_identity(str(empty))
    # The preprocessing script reports it without a traceback.
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "preprocess_data.py"), "--input", str(hf["jsonl"]),
                           "--tokenizer", str(empty), "--output-prefix", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "directory without a tokenizer.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_exported_student_carries_the_run_s_tokenizer(hf, tmp_path):
    """kdtrain convert kdtrain-to-hf writes the Hugging Face tokenizer the run read its data with
    (recorded in the checkpoint), so the exported directory loads as model + tokenizer."""
    import torch

    from kdtrain.cli import main
    from kdtrain.convert.hf_export import export_hf
    from kdtrain.convert.hf_import import import_hf
    from kdtrain.data import train_tokenizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "hf_student")
    import_hf(tmp_path / "hf_student", tmp_path / "ckpt", name="s")
    # What a distill/pretrain run records about its data (the import records none).
    (meta_file,) = (tmp_path / "ckpt").glob("step_*/meta.json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "data": {"tokenizer": str(hf["dir"])}}))

    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok(SAMPLES[0], add_special_tokens=False)["input_ids"] == Tokenizer(str(hf["dir"])).encode(SAMPLES[0])
    assert tok.eos_token == EOS
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.vocab_size == 400
    # The student learned to stop at the run tokenizer's end token, not at the imported model's (2).
    assert loaded.config.eos_token_id == Tokenizer(str(hf["dir"])).eos_id != 2
    assert not (tmp_path / "out" / "generation_config.json").exists()  # the source's names eos 2

    # none: model only; an explicit SentencePiece model: written as a tokenizer.json that encodes as
    # it does (tests/test_hf_tokenizer_export.py); a larger vocabulary: a clear error.
    export_hf(tmp_path / "ckpt", tmp_path / "bare", tokenizer=None)
    assert not (tmp_path / "bare" / "tokenizer.json").exists() and (tmp_path / "bare" / "model.safetensors").exists()
    spm = train_tokenizer([str(hf["jsonl"])], str(tmp_path / "spm"), vocab_size=320)
    export_hf(tmp_path / "ckpt", tmp_path / "x", tokenizer=spm)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "x")(SAMPLES[0], add_special_tokens=False)[
        "input_ids"] == Tokenizer(spm).encode(SAMPLES[0])
    big = tmp_path / "big"
    transformers.PreTrainedTokenizerFast(tokenizer_object=_bpe(hf["texts"], 500), eos_token=EOS).save_pretrained(big)
    with pytest.raises(ValueError, match="has 500 ids but model 's' has vocab_size=400"):
        export_hf(tmp_path / "ckpt", tmp_path / "y", tokenizer=str(big))
    assert not (tmp_path / "y" / "model.safetensors").exists()


def test_a_model_directory_with_only_a_sentencepiece_model(hf, tmp_path):
    """Older Hugging Face releases (Llama 2, Mistral) ship tokenizer.model alone: the directory opens
    it as the SentencePiece tokenizer it is, with the .model file's ids and fingerprint."""
    import shutil

    from kdtrain.data import train_tokenizer

    spm = train_tokenizer([str(hf["jsonl"])], str(tmp_path / "spm"), vocab_size=320)
    d = tmp_path / "llama2-style"
    d.mkdir()
    shutil.copy(spm, d / "tokenizer.model")
    tok, ref = Tokenizer(str(d)), Tokenizer(spm)
    assert type(tok).__name__ == "SentencePieceTokenizer" and tok.fingerprint == ref.fingerprint
    assert tok.encode(SAMPLES[0]) == ref.encode(SAMPLES[0]) and tok.eos_id == ref.eos_id


BOS = "<|begin_of_text|>"


def _with_bos_template(hf, where: Path) -> Path:
    """The fixture's tokenizer as Llama 3 ships its own: a BOS special token that tokenizer.json's
    template puts before every text (transformers' default call adds it)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    bpe = Backend.from_file(str(hf["dir"] / "tokenizer.json"))
    bpe.add_special_tokens([BOS])
    bos = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=BOS).save_pretrained(where)
    return where


def test_documents_start_as_the_tokenizer_s_convention_says(hf, tmp_path):
    """A Llama-3-style tokenizer starts every text with BOS; preprocessing writes what transformers'
    default call gives (then EOS), unless --no-prepend-bos; GPT-2 / Qwen-style tokenizers add nothing."""
    import subprocess
    import sys

    llama = _with_bos_template(hf, tmp_path / "llama3-style")
    tok, reference = Tokenizer(str(llama)), transformers.AutoTokenizer.from_pretrained(llama)
    assert tok.document_prefix == [tok.bos_id] == [reference.convert_tokens_to_ids(BOS)]
    assert Tokenizer(str(hf["dir"])).document_prefix == []
    texts = hf["texts"]
    prefix = str(tmp_path / "bos")
    meta = encode_files([str(hf["jsonl"])], str(llama), prefix)
    assert meta["document_prefix"] == [tok.bos_id]
    want = [reference(t)["input_ids"] + [tok.eos_id] for t in texts]
    assert want[0][0] == tok.bos_id and want[0][1] != tok.bos_id
    assert open_indexed_dataset(prefix).tokens.tolist() == [i for w in want for i in w]
    # The script's flag: no BOS, the tokens of the plain encoding.
    repo = Path(__file__).resolve().parents[1]
    plain = str(tmp_path / "plain")
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "preprocess_data.py"), "--input", str(hf["jsonl"]),
                           "--tokenizer", str(llama), "--output-prefix", plain, "--no-prepend-bos"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert open_indexed_dataset(plain).tokens.tolist() == [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    assert open_indexed_dataset(plain).meta["document_prefix"] == []
    # Asked for where it cannot apply: clear errors.
    with pytest.raises(ValueError, match="prepend_bos .*tokenizer .* has no BOS token"):
        encode_files([str(hf["jsonl"])], str(hf["dir"]), str(tmp_path / "x"), prepend_bos=True)
    # A plain prompt / completion pair (no template renders it) starts as a text document does.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "def f(x):", "completion": " return x"}) + "\n")
    for flag, lead in ((None, [tok.bos_id]), (False, [])):
        meta = encode_files([str(pairs)], str(llama), str(tmp_path / f"pairs{flag}"), format="chat", prepend_bos=flag)
        ds = open_indexed_dataset(str(tmp_path / f"pairs{flag}"))
        want = lead + tok.encode("def f(x):") + tok.encode(" return x") + [tok.eos_id]
        assert ds.tokens.tolist() == want and meta["document_prefix"] == lead
        assert ds.loss_mask(0, len(want)).tolist() == [False] * (len(want) - len(tok.encode(" return x")) - 1) + \
            [True] * (len(tok.encode(" return x")) + 1)


def test_a_sentencepiece_directory_states_its_bos_in_its_config(hf, tmp_path):
    """A directory with only tokenizer.model (Llama 2) prepends BOS when its tokenizer_config.json
    says ``add_bos_token: true``, or names a Llama tokenizer without the key (transformers' default
    for those), as transformers' Llama tokenizer does; a bare .model adds nothing."""
    import shutil

    from kdtrain.data import train_tokenizer

    spm = train_tokenizer([str(hf["jsonl"])], str(tmp_path / "spm"), vocab_size=320)
    d = tmp_path / "llama2-style"
    d.mkdir()
    shutil.copy(spm, d / "tokenizer.model")
    assert Tokenizer(spm).document_prefix == [] and Tokenizer(str(d)).document_prefix == []
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False}))
    assert Tokenizer(str(d)).document_prefix == []
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))  # its default: on
    assert Tokenizer(str(d)).document_prefix == [Tokenizer(str(d)).bos_id]
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    tok = Tokenizer(str(d))
    assert tok.document_prefix == [tok.bos_id] and tok.bos_id >= 0
    prefix = str(tmp_path / "corpus")
    encode_files([str(hf["jsonl"])], str(d), prefix)
    ds = open_indexed_dataset(prefix)
    first = ds.tokens[:ds.document_lengths[0]].tolist()
    assert first == [tok.bos_id] + tok.encode(hf["texts"][0]) + [tok.eos_id]
