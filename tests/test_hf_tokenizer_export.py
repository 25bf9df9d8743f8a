"""``kdtrain convert kdtrain-to-hf`` with a SentencePiece tokenizer (the demo's kind; written as a
tokenizer.json by kdtrain/convert/hf_sentencepiece.py): ``AutoTokenizer`` on the exported directory
encodes every text to the ids kdtrain's data pipeline gives it and decodes them back, config.json
names the tokenizer's end tokens, the run's tokenizer is found without ``--tokenizer``, and a model
that cannot be written to encode the same (a Unigram model, a character map, a model type whose
transformers class rebuilds the pipeline) is refused, naming the file, rather than written.

The student is a tiny Llama imported from a Hugging Face directory; what a distill or pretrain run
records about its data is written into its checkpoint's meta.json, as ``save_role`` does."""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings

import pytest
import sentencepiece as spm

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from kdtrain.cli import main  # noqa: E402
from kdtrain.convert.hf_export import export_hf  # noqa: E402
from kdtrain.data import Tokenizer, encode_files, iter_documents, open_indexed_dataset, train_tokenizer  # noqa: E402

SAMPLES = ["def f(x):\n    return x + 1\n", "Plain ASCII text, with punctuation.", "  two leading, two trailing  ",
           "a   b    c", "line\n\nbreaks\r\n\ttab\n", "\n", "ünïcödé 漢字 😀 Ω≈ç", "0123456789 3.14159 1,000",
           "</s> <s> <unk> <0x41> as text", "", " ", "   "]


def _hf_student(root, cls="Llama"):
    import torch

    from kdtrain.convert.hf_import import import_hf

    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(vocab_size=640, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=64)
    getattr(transformers, f"{cls}ForCausalLM")(config).save_pretrained(root / f"hf_{cls}")
    import_hf(root / f"hf_{cls}", root / f"ckpt_{cls}", name="s")
    return root / f"ckpt_{cls}"


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """An imported tiny Llama checkpoint (vocab_size 640: the tokenizers below have up to 600 ids)."""
    return _hf_student(tmp_path_factory.mktemp("student"))


def _as_run(ckpt, where, **record):
    """A copy of ``ckpt`` at ``where`` whose meta.json records what a run records (``data``,
    ``tokenizer_fingerprint``)."""
    shutil.copytree(ckpt, where)
    (meta_file,) = where.glob("step_*/meta.json")
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **record}))
    return where


def _pipeline_ids(texts, tokenizer, where) -> list[list[int]]:
    """Each text's ids as kdtrain's preprocessor writes the document (BOS convention, ids, EOS)."""
    corpus = where / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(where / "docs")
    encode_files([str(corpus)], tokenizer, prefix)
    ds = open_indexed_dataset(prefix)
    tokens, ends = ds.tokens.tolist(), ds.document_lengths.cumsum().tolist()
    return [tokens[a:b] for a, b in zip([0] + ends[:-1], ends)]


def test_the_run_s_sentencepiece_tokenizer_is_exported_and_encodes_as_the_pipeline(corpus, student, tmp_path):
    """No --tokenizer: the run's data.tokenizer (a SentencePiece .model) is written; AutoTokenizer
    gives kdtrain's ids for every sample, decodes them back, and its default call is the
    preprocessor's document less the EOS; config.json and the generation defaults end at its EOS."""
    model = corpus["model"]
    tok, sp = Tokenizer(model), spm.SentencePieceProcessor(model_file=model)
    ckpt = _as_run(student, tmp_path / "ckpt", data={"tokenizer": model, "path": []},
                   tokenizer_fingerprint=tok.fingerprint)
    out = tmp_path / "out"
    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(ckpt), "--out", str(out)]) == 0

    hf = transformers.AutoTokenizer.from_pretrained(out)
    texts = SAMPLES + list(iter_documents(str(corpus["jsonl"])))[:8]
    for text in texts:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) == sp.encode(text), text
        assert hf.decode(ids) == text == tok.decode(ids)  # byte fallback, identity normalization: lossless
        assert hf(text)["input_ids"] == ids  # a bare .model: documents start without BOS
    documents = [t for t in texts if t.strip()]  # the preprocessor skips blank documents
    eos = sp.eos_id()
    assert _pipeline_ids(documents, model, tmp_path) == [hf(t)["input_ids"] + [eos] for t in documents]
    assert hf.eos_token_id == eos and hf.bos_token_id == sp.bos_id() and hf.pad_token_id is None

    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (eos, sp.bos_id(), None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.generation_config.eos_token_id == eos == 2
    # kdtrain reads the exported directory back as the same tokenizer.
    again = Tokenizer(str(out))
    assert again.eos_id == eos and again.document_prefix == [] and again.encode_batch(texts) == tok.encode_batch(texts)


def test_a_named_model_and_a_llama_style_directory_with_bos(corpus, student, tmp_path):
    """--tokenizer names a .model; a directory holding only tokenizer.model whose
    tokenizer_config.json asks for BOS (older Llama releases) exports a tokenizer whose default call
    starts with BOS, as the preprocessor starts each document."""
    model = corpus["model"]
    export_hf(student, tmp_path / "named", tokenizer=model)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "named")
    assert hf(SAMPLES[0], add_special_tokens=False)["input_ids"] == Tokenizer(model).encode(SAMPLES[0])

    llama2 = tmp_path / "llama2-style"
    llama2.mkdir()
    shutil.copy(model, llama2 / "tokenizer.model")
    (llama2 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = Tokenizer(str(llama2))
    assert tok.document_prefix == [tok.bos_id] == [1]
    assert main(["convert", "kdtrain-to-hf", "--ckpt", str(student), "--out", str(tmp_path / "out"),
                 "--tokenizer", str(llama2)]) == 0
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    documents = [t for t in SAMPLES if t.strip()]
    want = _pipeline_ids(documents, str(llama2), tmp_path)
    assert want[0][0] == tok.bos_id and want == [hf(t)["input_ids"] + [tok.eos_id] for t in documents]
    assert hf.decode(hf(SAMPLES[0])["input_ids"], skip_special_tokens=True) == SAMPLES[0]


def _spm(sentences, **settings) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
                                   vocab_size=600, character_coverage=1.0, minloglevel=2, **settings)
    return model.getvalue()


def test_sentencepiece_settings_are_written_exactly_or_refused(corpus, student, tmp_path):
    """Whitespace settings sentencepiece models are trained with (extra whitespace removed, no
    dummy prefix) encode and decode as sentencepiece; what cannot be written so is refused naming
    the file: named, an error before --out is touched; found by auto, a warning (config.json still
    gets the model's end tokens)."""
    from kdtrain.convert.hf_sentencepiece import sentencepiece_files
    from tokenizers import Tokenizer as Backend

    texts = list(iter_documents(str(corpus["jsonl"])))
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    probes = SAMPLES + [" \n  x  \n", "\u2581", "a\u2581 b \u2581"] + texts[:10]
    for name, settings in [("extra-ws", dict(remove_extra_whitespaces=True)),
                           ("no-prefix", dict(add_dummy_prefix=False, remove_extra_whitespaces=False)),
                           ("both", dict(add_dummy_prefix=False, remove_extra_whitespaces=True))]:
        path = tmp_path / f"{name}.model"
        path.write_bytes(_spm(lines, normalization_rule_name="identity", byte_fallback=True, **settings))
        sp = spm.SentencePieceProcessor(model_file=str(path))
        backend = Backend.from_str(sentencepiece_files(Tokenizer(str(path)))["tokenizer.json"].decode())
        for text in probes:
            ids = backend.encode(text, add_special_tokens=False).ids
            assert ids == sp.encode(text), (name, text)
            assert backend.decode(ids) == sp.decode(ids), (name, text)

    refused = {"nfkc.model": (_spm(lines, byte_fallback=True), "normalization rule 'nmt_nfkc'"),
               "unk.model": (_spm(lines, normalization_rule_name="identity"), "no byte fallback")}
    unigram = train_tokenizer([str(corpus["jsonl"])], str(tmp_path / "unigram"), vocab_size=320,
                              model_type="unigram")
    refused["unigram.model"] = ((tmp_path / "unigram.model").read_bytes(), "Unigram model")
    for name, (data, why) in refused.items():
        (tmp_path / name).write_bytes(data)
        named = re.escape(str(tmp_path / name))
        with pytest.raises(ValueError, match=f"--tokenizer: SentencePiece model {named} cannot be written as a "
                                             f"Hugging Face tokenizer .*{why}"):
            export_hf(student, tmp_path / "x", tokenizer=str(tmp_path / name))
        assert not (tmp_path / "x").exists()

    ckpt = _as_run(student, tmp_path / "ckpt", data={"tokenizer": unigram})
    with pytest.warns(UserWarning, match=f"SentencePiece model {re.escape(unigram)} cannot be written .*Unigram "
                                         "model.*The export holds no tokenizer"):
        export_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == Tokenizer(unigram).eos_id


def test_a_qwen2_export_never_holds_a_tokenizer_that_encodes_otherwise(corpus, tmp_path):
    """transformers picks the tokenizer class by model type too (5.x: Qwen2Tokenizer for every
    qwen2 model, a byte-level BPE rebuilt from the vocabulary): the export checks the directory as
    transformers loads it, and writes the tokenizer only where it encodes as kdtrain's, else warns
    naming the file."""
    model = corpus["model"]
    ckpt = _as_run(_hf_student(tmp_path, "Qwen2"), tmp_path / "run", data={"tokenizer": model})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_hf(ckpt, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == Tokenizer(model).eos_id
    if (out / "tokenizer.json").exists():
        hf = transformers.AutoTokenizer.from_pretrained(out)
        assert [hf(t, add_special_tokens=False)["input_ids"] for t in SAMPLES] == Tokenizer(model).encode_batch(SAMPLES)
    else:
        assert any(f"SentencePiece model {model} written as a Hugging Face tokenizer: transformers" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        with pytest.raises(ValueError, match="--tokenizer: .*loads it as"):
            export_hf(ckpt, tmp_path / "named", tokenizer=model)
        assert not (tmp_path / "named").exists()


def test_the_tokenizer_is_found_through_the_corpora_and_checked_against_the_run(corpus, student, tmp_path):
    """Without data.tokenizer, the one the run's corpora record; a tokenizer file that changed since
    the run (another fingerprint than the checkpoint's) is not exported, with a warning."""
    model = corpus["model"]
    prefix = str(tmp_path / "corpus")
    encode_files([str(corpus["jsonl"])], model, prefix)
    fingerprint = Tokenizer(model).fingerprint
    ckpt = _as_run(student, tmp_path / "ckpt", data={"path": [prefix]}, tokenizer_fingerprint=fingerprint)
    export_hf(ckpt, tmp_path / "out")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf(SAMPLES[0], add_special_tokens=False)["input_ids"] == Tokenizer(model).encode(SAMPLES[0])

    changed = _as_run(student, tmp_path / "changed", data={"tokenizer": model}, tokenizer_fingerprint="0" * 16)
    with pytest.warns(UserWarning, match=f"tokenizer {re.escape(model)} is not the one checkpoint .* was trained on .*"
                                         f"{fingerprint}.* not exported"):
        export_hf(changed, tmp_path / "out2")
    assert not (tmp_path / "out2" / "tokenizer.json").exists()
