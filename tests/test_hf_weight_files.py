"""The weight files of a Hugging Face directory: what a training rank opens of them (the index
names each tensor's file) and the digests a teacher cache records of them (kdtrain/convert/
hf_weights.py, kdtrain/cache/manifest.py). A tiny random Llama written as several safetensors
files with an index; no hub access."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The sharded Llama's directory and its kdtrain model config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdtrain.convert.hf_weights import HFModel

    torch.manual_seed(0)
    hf = tmp_path_factory.mktemp("hf") / "hf_llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf, max_shard_size="100KB")
    return {"hf": hf, "cfg": HFModel(hf, "tiny-llama").cfg}


def test_a_loading_rank_opens_only_the_files_it_reads(sharded, tmp_path):
    """With an index, a loading rank (``lazy``) opens only the files holding the tensors it reads,
    and gets what an eager open reads; a missing file, or a tensor the index misplaces, is named
    when read."""
    import shutil

    from kdtrain.convert.hf_weights import SafetensorsDir

    hf = sharded["hf"]
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2
    eager, lazy = SafetensorsDir(hf), SafetensorsDir(hf, lazy=True)
    assert lazy.names() == eager.names() == set(index) and not lazy._handles
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(lazy.get(name), eager.get(name)) and lazy.shape(name) == eager.shape(name)
    assert list(lazy._handles) == [index[name]]

    damaged = tmp_path / "hf"
    shutil.copytree(hf, damaged)
    (damaged / index[name]).unlink()
    lazy = SafetensorsDir(damaged, lazy=True)
    with pytest.raises(ValueError, match=f"shard {index[name]} is missing"):
        lazy.get(name)
    other = next(n for n, f in index.items() if f != index[name])
    moved = dict(index, **{other: index[name]})
    (damaged / "model.safetensors.index.json").write_text(json.dumps({"weight_map": moved}))
    shutil.copy(hf / index[name], damaged / index[name])
    with pytest.raises(ValueError, match=f"tensor '{other}' is not in {index[name]}"):
        SafetensorsDir(damaged, lazy=True).get(name)


def test_teacher_digest_of_hf_dir(sharded, tmp_path):
    """A teacher cache built from a Hugging Face teacher is tied to its weight files' bytes."""
    import shutil

    from kdtrain.cache.manifest import teacher_weights_digest

    src = sharded["hf"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    assert teacher_weights_digest(str(copy)) == teacher_weights_digest(str(src))
    f = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert teacher_weights_digest(str(copy)) != teacher_weights_digest(str(src))


def test_teacher_files_a_manifest_lists_are_not_read_again(sharded, tmp_path, monkeypatch):
    """A 70B teacher is 140 GB: a restarted cache job and a mixed run's check take the manifest's
    digest for weight files with the sizes and mtimes it lists, and a process hashes files once
    while they are unchanged; a rewritten file is read again."""
    import shutil

    import kdtrain.cache.manifest as manifest

    src = sharded["hf"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # keeps the mtimes
    digest, listed = manifest.teacher_weights(str(copy))
    assert digest == manifest.teacher_weights_digest(str(src))
    assert sorted(name for name, _, _ in listed) == sorted(p.name for p in copy.glob("*.safetensors"))
    reads = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda f, h=None: reads.append(Path(f).name) or real(f, h))
    manifest._DIGESTS.clear()
    recorded = manifest.teacher_identity(sharded["cfg"], str(src), 0, "float32")
    assert reads and recorded["weights_sha256"] == digest and recorded["weights_stat"] == listed
    reads.clear()
    assert manifest.teacher_weights(str(copy), recorded) == (digest, listed) and reads == []
    assert manifest.teacher_weights(str(src)) == (digest, listed) and reads == []  # hashed once above
    # The files' sizes and mtimes are not part of the cache's identity (a copy is the same teacher).
    assert manifest._content(recorded) == manifest._content({k: v for k, v in recorded.items() if k != "weights_stat"})

    f = copy / listed[-1][0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    changed, relisted = manifest.teacher_weights(str(copy), recorded)
    assert changed != digest and relisted != listed and reads


def test_teacher_weight_digests_per_file_and_of_earlier_manifests(sharded, tmp_path):
    """New manifests record a digest of the files' own digests (hashed side by side: a 405B
    teacher is 810 GB); a manifest of an earlier version, without ``weights_hash``, is checked by
    its own rule (sha256 over the files' names and bytes in turn), and a resumed job keeps it."""
    import hashlib
    import shutil

    import kdtrain.cache.manifest as manifest

    src = sharded["hf"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    files = sorted(copy.glob("*.safetensors"))
    assert len(files) > 2
    per_file = hashlib.sha256(b"".join(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode()
                                       + b"\n" for f in files)).hexdigest()
    stream = hashlib.sha256(b"".join(f.name.encode() + b"\0" + f.read_bytes() for f in files)).hexdigest()
    cfg = sharded["cfg"]
    new = manifest.teacher_identity(cfg, str(copy), 0, "float32")
    assert new["weights_sha256"] == per_file and new["weights_hash"] == "files"
    earlier = {k: v for k, v in new.items() if k != "weights_hash"}
    earlier.update(weights_sha256=stream, weights_stat=[[n, size, mtime + 1] for n, size, mtime in new["weights_stat"]])
    manifest._DIGESTS.clear()
    assert manifest.teacher_weights(str(copy), earlier)[0] == stream  # stats differ: hashed by the earlier rule
    assert "weights_hash" not in manifest.teacher_identity(cfg, str(copy), 0, "float32", recorded=earlier)
