"""``kdtrain eval``: the held-out loss it reports over a conversation corpus' targets is the one
the training run logged for the same windows (here packed by documents, which eval must be told
as the run was), the prompts and all tokens are reported apart, and bad arguments are clear
errors."""

from __future__ import annotations

import json

import pytest

from conftest import pretend_transformer_engine, read_metrics
from kdtrain.config import load_pretrain_config


def test_eval_reproduces_the_runs_held_out_loss(world_of_one, tiny_chat_corpus, tmp_path, capsys):
    from kdtrain.cli import main
    from kdtrain.training.pretrain import pretrain

    data = [f"data.path=[{tiny_chat_corpus['prefix']}]", f"data.tokenizer={tiny_chat_corpus['tokenizer']}",
            "data.seq_length=32", "data.split=[0.9,0.1]", "data.packing=documents"]
    pretrain(load_pretrain_config("tiny", data + [
        "precision.device=cpu", "training.train_steps=6", "training.eval_batches=2", "training.global_batch_size=8",
        "training.micro_batch_size=4", f"logging.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'ckpt'}"]))
    logged = read_metrics(tmp_path / "run", "valid")[6]["valid_loss"]
    # The run evaluated its first 2 x 8 held-out windows, counting the replies only.
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", tiny_chat_corpus["prefix"], "--seq-length", "32",
                 "--split", "0.9", "0.1", "--packing", "documents", "--max-windows", "16",
                 "--tokenizer", tiny_chat_corpus["tokenizer"],
                 "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())[str(tmp_path / "ckpt")]
    assert got["targets_loss"] == pytest.approx(logged, rel=1e-5)
    assert got["tokens"] == 16 * 32 and 0 < got["target_tokens"] < got["tokens"]
    out = capsys.readouterr().out
    assert "ckpt" in out and f"16 of {got['held_out_windows']} held-out windows" in out and got["windows"] == 16
    stream = main(["eval", "--model", str(tmp_path / "ckpt"), "--data", tiny_chat_corpus["prefix"], "--seq-length",
                   "32", "--split", "0.9", "0.1", "--max-windows", "16", "--device", "cpu"])
    assert stream == 0 and f"{got['targets_loss']:9.4f}" not in capsys.readouterr().out.splitlines()[-1]
    # Without --data: the data section the run recorded in its checkpoint (packing included).
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--max-windows", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "documents packing" in out and f"{got['targets_loss']:9.4f}" in out.splitlines()[-1]
    n, t = got["tokens"], got["target_tokens"]
    assert got["all_loss"] == pytest.approx((got["targets_loss"] * t + got["context_loss"] * (n - t)) / n, rel=1e-9)

    for args, msg in ((["--seq-length", "512"], "exceeds the max_seq_length"),
                      (["--seq-length", "32", "--split", "1.0", "0.0"], "no held-out windows"),
                      (["--seq-length", "32", "--tokenizer", str(tmp_path / "none.model")], "does not exist"),
                      ([], "--data needs --seq-length"),
                      # refused before scoring (the whole evaluation was lost to an IsADirectoryError)
                      (["--seq-length", "32", "--out", str(tmp_path)], "is a directory (name the results JSON")):
        assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", tiny_chat_corpus["prefix"], *args,
                     "--device", "cpu"]) == 2
        assert msg in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--seq-length", "32", "--device", "cpu"]) == 2
    assert "describe --data" in capsys.readouterr().err


def test_eval_with_a_teacher_reproduces_the_runs_held_out_divergence(world_of_one, tiny_corpus, tmp_path, capsys,
                                                                     monkeypatch):
    """``kdtrain eval --teacher``: the divergence to the teacher it computes offline, with the loss
    and k the distillation run recorded, is the ``valid_kd_loss`` the run logged (computed there
    through the teacher -> student channel) on the same held-out windows. Eval builds kdtrain's
    local layers where Transformer Engine imports too (attention within documents needs them)."""
    from kdtrain.cli import main
    from kdtrain.config.distill import load_distill_config
    from kdtrain.training.distill import distill
    from kdtrain.training.pretrain import pretrain

    data = [f"data.path=[{tiny_corpus['prefix']}]", f"data.tokenizer={tiny_corpus['tokenizer']}"]
    pretrain(load_pretrain_config("tiny", data + [
        "precision.device=cpu", "training.train_steps=3", f"logging.dir={tmp_path / 'teacher-run'}",
        f"checkpoint.dir={tmp_path / 'teacher'}"]))
    distill(load_distill_config("tiny", data + [
        "precision.device=cpu", "teacher.random_init=false", f"teacher.load={tmp_path / 'teacher'}",
        "loss.divergence=jsd", "loss.beta=0.3", "loss.tau=2.0", f"logging.dir={tmp_path / 'run'}",
        f"checkpoint.dir={tmp_path / 'student'}"]))
    logged = read_metrics(tmp_path / "run", "valid")[4]
    capsys.readouterr()
    pretend_transformer_engine(monkeypatch)
    assert main(["eval", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--max-windows", "8", "--device", "cpu", "--out", str(tmp_path / "eval.json")]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())[str(tmp_path / "student")]
    assert got["targets_loss"] == pytest.approx(logged["valid_loss"], rel=1e-5)
    assert got["kd_loss"] == pytest.approx(logged["valid_kd_loss"], rel=1e-5) and got["kd_loss"] > 0
    out = capsys.readouterr().out
    assert f"{got['kd_loss']:9.4f}" in out
    # A corpus without a loss mask: every token is a target, there is no context loss to report.
    assert got["context_loss"] is None and got["all_loss"] == got["targets_loss"]
    assert out.splitlines()[-1].split()[1:] == [f"{got['targets_loss']:.4f}", "-", f"{got['all_loss']:.4f}",
                                                f"{got['kd_loss']:.4f}"] and "nan" not in out
    # Payloads over the host bound: scored in parts (the teacher and the model loaded per part),
    # the same sums in the same order: equal results, bit for bit.
    common = ["eval", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
              "--max-windows", "8", "--batch", "2", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "whole.json")]) == 0
    assert "scoring in" not in capsys.readouterr().out
    assert main([*common, "--payload-gib", "1e-9", "--out", str(tmp_path / "parts.json")]) == 0
    assert "scoring in 4 parts of up to 2 windows" in capsys.readouterr().out
    assert json.loads((tmp_path / "parts.json").read_text()) == json.loads((tmp_path / "whole.json").read_text())
    assert main(["eval", "--model", str(tmp_path / "student"), "--payload-gib", "1", "--device", "cpu"]) == 2
    assert "--payload-gib bounds the --teacher payloads" in capsys.readouterr().err
    # Other loss settings give another divergence; settings without a teacher are an error.
    assert main(["eval", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--max-windows", "8", "--device", "cpu", "--divergence", "forward_kl", "--tau", "1.0",
                 "--out", str(tmp_path / "fkl.json")]) == 0
    fkl = json.loads((tmp_path / "fkl.json").read_text())[str(tmp_path / "student")]["kd_loss"]
    assert abs(fkl - got["kd_loss"]) > 1e-3 * got["kd_loss"]
    assert main(["eval", "--model", str(tmp_path / "student"), "--tau", "2", "--device", "cpu"]) == 2
    assert "describe the divergence to --teacher" in capsys.readouterr().err
    for args, message in ((["--topk", "0"], "--topk must be >= 1"),  # not the run's k in disguise
                          (["--out", str(tmp_path / "missing" / "x.json")], "its directory does not exist")):
        assert main(["eval", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                     "--device", "cpu", *args]) == 2
        assert message in capsys.readouterr().err


def test_token_losses_are_cross_entropy_a_block_of_positions_at_a_time():
    """eval's per-token losses: those of the training loop's held-out pass (padding columns
    excluded), with no tensor larger than one block's fp32 logits (whole, at batch 8, seq 8192,
    vocabulary 128k, the fp32 copies were several times the 17 GB of bf16 logits)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from kdtrain.evaluate.cli import token_losses

    s, b, vocab, padded = 64, 3, 50, 56
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(s, b, padded, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (s, b), generator=g)
    logits_ptr = logits.untyped_storage().data_ptr()

    class Largest(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # Views of the logits (a reshape) allocate nothing.
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != logits_ptr:
                    Largest.bytes = max(Largest.bytes, t.numel() * t.element_size())
            return out

    block = 8 * b * padded * 4  # 8 positions' fp32 logits
    with Largest():
        got = token_losses(logits, labels, vocab, chunk_bytes=block)
    assert 0 < Largest.bytes <= block, (Largest.bytes, block)
    want = F.cross_entropy(logits[..., :vocab].float().permute(1, 2, 0), labels.t(), reduction="none").t()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
