r"""``kdtrain eval``: held-out next-token loss of checkpoints on a corpus, the same windows for
every model, whatever each run trained on.

    kdtrain eval --model checkpoints/student-a checkpoints/student-b     # the first run's own held-out data
    kdtrain eval --model checkpoints/student /models/Qwen2.5-0.5B --data data/chat/chat_document \
        --seq-length 1024 --split 0.98 0.02 --packing documents

``--model`` takes kdtrain checkpoints (any layout) and Hugging Face directories. The data: without
``--data``, the ``data`` section the first checkpoint's run recorded (corpora, weights,
tokenizer, sequence length, split, seed, packing, attention, loss mask), so the windows are that run's
held-out windows; with ``--data``, those flags (defaults as a run's). Either way the corpus is
opened as a run opens it (blends, packing, tokenizer and vocabulary checks), and the first
``--max-windows`` held-out windows (else all) are scored. Reported per model, in nats: the loss
over the target tokens (on a conversation corpus the replies; every token otherwise), over the
other tokens (prompts, padding; ``-``, and null in ``--out``, where every token is a target) and
over all tokens, with the token counts. One process, the whole model on one device (GPU when there
is one; bf16 there, fp32 on CPU), on kdtrain's local layers (attention within documents needs
them; Transformer Engine's are not used).

``--teacher T`` also reports each model's divergence to the teacher over the target tokens
(``kd_loss``, per token, at the teacher's top-k as a distillation run computes it): with the
loss (divergence, beta, tau, tail) and ``teacher.topk`` the first checkpoint's distillation run
recorded, else forward KL at tau 1 and k 64; ``--divergence``, ``--beta``, ``--tau``, ``--topk``
override. A run scores the first ``training.eval_batches x training.global_batch_size`` of its
held-out windows (all, when there are fewer): on its own held-out data, ``--max-windows`` with
that number gives its logged ``valid_loss`` and ``valid_kd_loss``; by default every held-out window
is scored, a larger sample of the same data. The teacher runs
first and its top-k payloads wait in host memory (``8 k + 4`` bytes per position) for the models;
windows whose payloads would take more than half the host's available memory
(``--payload-gib`` sets the bound) are scored in consecutive parts, the teacher and each model
loaded once per part: the same sums, in the same order.

    kdtrain eval --model checkpoints/student-a checkpoints/student-b --teacher checkpoints/teacher
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..cli import DefaultsHelp, check_out_file
from ..durable import write_atomically


def _batches(dataset, windows: range, batch: int, device):
    """(micro-batch, target flags [b, s] bool) of each ``batch`` held-out windows of ``windows``."""
    import numpy as np
    import torch

    from ..training.batches import make_microbatch, stack_rows

    for start in range(windows.start, windows.stop, batch):
        ids = range(start, min(start + batch, windows.stop))
        mb = make_microbatch(np.stack([dataset.valid_sample(j) for j in ids]), device,
                             positions=stack_rows(dataset.valid_positions, ids))
        mask = (torch.from_numpy(np.stack([dataset.valid_loss_mask(j) for j in ids])).to(device)
                if dataset.has_loss_mask else torch.ones_like(mb.labels, dtype=torch.bool))
        yield mb, mask


def payload_window_bytes(seq_length: int, k: int) -> int:
    """Host bytes of one window's teacher payload (``teacher_payloads``): int32 ids and fp32 values
    of the top k, and the fp32 tail log-mass, per position."""
    return seq_length * (8 * k + 4)


def window_parts(windows: int, batch: int, window_bytes: int, budget: int) -> list[range]:
    """Consecutive ranges of the ``windows`` held-out windows whose payloads take at most ``budget``
    bytes each (whole batches; at least one batch per part)."""
    span = max(1, budget // max(1, window_bytes * batch)) * batch
    return [range(a, min(a + span, windows)) for a in range(0, windows, span)]


def teacher_payloads(teacher, vocab_size: int, dataset, windows: range, batch: int, device, k: int,
                     tau: float) -> list:
    """The teacher's top-k ids (int32), values and tail log-mass at ``tau`` ([s, b, ...], on the
    host) for each batch of the held-out ``windows``, as a distillation run's teacher computes them."""
    import torch

    from ..stream import vocab_parallel_topk

    out = []
    with torch.no_grad():
        for mb, _ in _batches(dataset, windows, batch, device):
            ids, values, tail_lse = vocab_parallel_topk(mb.forward(teacher), k, vocab_size, None, tau=tau)
            out.append((ids.to(torch.int32).cpu(), values.float().cpu(), tail_lse.float().cpu()))
    return out


def token_losses(logits_SBV, labels_SB, vocab_size: int, chunk_bytes: int = 256 * 2**20):
    """Cross entropy per token [s, b] (fp32) of logits [s, b, padded V], as the training loop's
    held-out pass computes it (loss/cross_entropy.py, which upcasts at most ``chunk_bytes`` of
    the logits at a time and makes no gradient without autograd)."""
    from ..loss.cross_entropy import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits_SBV, labels_SB, vocab_size, chunk_bytes=chunk_bytes)


def heldout_sums(model, vocab_size: int, dataset, windows: range, batch: int, device, teacher=None,
                 sums: Optional[dict] = None) -> dict:
    """Cross-entropy sums and token counts of ``model`` over the held-out ``windows`` of
    ``dataset``, split by the dataset's target flags (targets, context, all); with ``teacher`` =
    (``teacher_payloads`` of those windows, KDLossConfig) also the sum of the divergence to it over
    the targets (kd). Added to ``sums``, the running totals of the parts before (a new dict when
    None); ``_losses`` turns the totals into per-token losses."""
    import dataclasses

    import torch

    from ..loss import kd_loss

    sums = sums if sums is not None else {**{k: [0.0, 0] for k in ("targets", "context", "all")}, "kd": 0.0}
    with torch.no_grad():
        for i, (mb, mask) in enumerate(_batches(dataset, windows, batch, device)):
            raw = mb.forward(model)  # [s, b, padded V]
            nll = token_losses(raw, mb.labels.t(), vocab_size).t()  # [b, s]
            for key, m in (("targets", mask), ("context", ~mask), ("all", torch.ones_like(mask))):
                sums[key][0] += float(nll[m].double().sum())
                sums[key][1] += int(m.sum())
            if teacher is not None:
                payloads, cfg = teacher
                ids, values, tail_lse = (t.to(device) for t in payloads[i])
                _, report = kd_loss(raw, ids, values, vocab_size=vocab_size, config=dataclasses.replace(cfg, alpha=0.0),
                                    loss_mask_SB=mask.t().float(), teacher_tail_lse_SB=tail_lse,
                                    impl="auto" if raw.is_cuda else "reference")
                sums["kd"] += float(report["kd_sum"])
    return sums


def _losses(sums: dict, kd: bool) -> dict:
    """``{targets,context,all}_loss`` and the token counts, with ``kd`` also ``kd_loss`` per target
    token. A loss over no tokens (the context of a corpus without a loss mask) is None."""
    out = {f"{k}_loss": (sums[k][0] / sums[k][1] if sums[k][1] else None) for k in ("targets", "context", "all")}
    out.update(target_tokens=sums["targets"][1], tokens=sums["all"][1])
    if kd:
        out["kd_loss"] = sums["kd"] / sums["targets"][1] if sums["targets"][1] else None
    return out


def _cell(loss: Optional[float]) -> str:
    """A loss in the table: ``-`` where it covers no tokens."""
    return f"{'-':>9s}" if loss is None else f"{loss:9.4f}"


def run_kd_config(model: str, overrides: dict):
    """(KDLossConfig, k) for ``--teacher``: the loss and ``teacher.topk`` the checkpoint's
    distillation run recorded (defaults otherwise), then the given overrides."""
    import dataclasses

    from ..config import from_dict
    from ..convert.hf_weights import is_hf_model_dir
    from ..convert.sources import CheckpointWeights
    from ..loss import KDLossConfig

    meta = {} if is_hf_model_dir(model) else CheckpointWeights(model).reader.meta
    cfg = from_dict(KDLossConfig, meta["loss"], f"{model}: loss") if meta.get("loss") else KDLossConfig()
    k = overrides.pop("topk", None)
    if k is None:
        k = meta.get("topk") or 64
    elif k < 1:
        raise ValueError(f"--topk must be >= 1, got {k}")
    cfg = dataclasses.replace(cfg, **{f: v for f, v in overrides.items() if v is not None})
    cfg.check("--divergence/--beta/--tau")
    return cfg, int(k)


def run_data_config(model: str):
    """The DataConfig a kdtrain checkpoint's run recorded; ValueError when there is none."""
    from ..config import DataConfig, from_dict
    from ..convert.hf_weights import is_hf_model_dir
    from ..convert.sources import CheckpointWeights

    if is_hf_model_dir(model):
        raise ValueError(f"{model} is a Hugging Face directory, which records no training data: pass --data "
                         "and --seq-length")
    recorded = CheckpointWeights(model).reader.meta.get("data")
    if not recorded:
        raise ValueError(f"checkpoint {model} records no data section: pass --data and --seq-length")
    return from_dict(DataConfig, recorded, f"{model}: data")


def evaluate_models(models: Sequence[str], data=None, *, max_windows: Optional[int] = None, batch: int = 8,
                    device: str = "auto", teacher: Optional[str] = None, kd_overrides: Optional[dict] = None,
                    payload_bytes: Optional[int] = None) -> tuple[dict[str, dict], object]:
    """Scores of every model on the held-out windows of ``data`` (a DataConfig; None: the first
    model's run's), with ``teacher`` also their divergence to it (``run_kd_config``);
    ``payload_bytes``: the bound on the teacher payloads held at once (default: half the host's
    available memory). Returns (results by model, the DataConfig used)."""
    import torch

    from ..convert.sources import open_weights
    from ..parallel import free_memory_bytes, one_process_world
    from ..training.checkpoint_load import load_whole_model
    from ..training.resume import data_tokenizer
    from ..training.pretrain import open_dataset

    if not models:
        raise ValueError("give at least one --model")
    if batch < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError("--batch and --max-windows must be >= 1")
    data = data if data is not None else run_data_config(models[0])
    if data.mock:
        raise ValueError("the run used mock data: pass --data and --seq-length")
    data.check()
    configs = {m: open_weights(m).cfg for m in [*models, *([teacher] if teacher else [])]}
    if teacher:
        other = {m: c.vocab_size for m, c in configs.items() if c.vocab_size != configs[teacher].vocab_size}
        if other:
            raise ValueError(f"--teacher {teacher} has vocab_size {configs[teacher].vocab_size}, but {other}: the "
                             "divergence needs one vocabulary")
    too_long = [m for m, c in configs.items() if data.seq_length > c.max_seq_length]
    if too_long:
        raise ValueError(f"sequence length {data.seq_length} exceeds the max_seq_length of {too_long}")
    dataset = open_dataset(data, min(configs.values(), key=lambda c: c.vocab_size))
    windows = dataset.num_valid_windows if max_windows is None else min(max_windows, dataset.num_valid_windows)
    if windows == 0:
        raise ValueError(f"data {list(data.path)} has no held-out windows at split {list(data.split)}")
    ids_of = data_tokenizer(data)  # models trained on another tokenizer's ids are refused
    parts = [range(windows)]
    if teacher:
        kd_cfg, k = run_kd_config(models[0], dict(kd_overrides or {}))
        if payload_bytes is None:
            payload_bytes = (free_memory_bytes(torch.device("cpu")) or 16 * 2**30) // 2
        per_window = payload_window_bytes(data.seq_length, k)
        parts = window_parts(windows, batch, per_window, payload_bytes)
        if len(parts) > 1:
            print(f"eval: the teacher's payloads for {windows} windows take {windows * per_window / 2**30:.1f} GiB, "
                  f"over the {payload_bytes / 2**30:.1f} GiB bound: scoring in {len(parts)} parts of up to "
                  f"{len(parts[0])} windows, each model loaded once per part", flush=True)
    sums: dict[str, Optional[dict]] = {m: None for m in models}
    with one_process_world(device) as env:
        dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
        for part in parts:
            kd = None
            if teacher:
                tcfg, net = load_whole_model(teacher, env.device, dtype, "eval --teacher", configs[teacher],
                                             use_te=False, tokenizer=ids_of)
                kd = (teacher_payloads(net, tcfg.vocab_size, dataset, part, batch, env.device, k, kd_cfg.tau), kd_cfg)
                del net
            for m in models:
                cfg, net = load_whole_model(m, env.device, dtype, "eval --model", configs[m], use_te=False,
                                            tokenizer=ids_of)
                sums[m] = heldout_sums(net, cfg.vocab_size, dataset, part, batch, env.device, kd, sums[m])
                del net
            del kd
    results = {m: _losses(s, bool(teacher)) for m, s in sums.items()}
    for r in results.values():
        r.update(windows=windows, held_out_windows=dataset.num_valid_windows)
    return results, data


def _run(args) -> int:
    from ..config import DataConfig

    data = None
    if args.data:
        if args.seq_length is None:
            raise ValueError("--data needs --seq-length (the run's data.seq_length)")
        given = {"split": None if args.split is None else tuple(args.split), "seed": args.seed,
                 "packing": args.packing, "attention": args.attention, "tokenizer": args.tokenizer}
        data = DataConfig(path=list(args.data), seq_length=args.seq_length, loss_mask=not args.every_token,
                          **{k: v for k, v in given.items() if v is not None})
    elif any(v is not None for v in (args.seq_length, args.tokenizer, args.packing, args.attention, args.split,
                                     args.seed)) or args.every_token:
        raise ValueError("--seq-length, --split, --seed, --packing, --attention, --tokenizer and --every-token "
                         "describe --data; without --data the first checkpoint's run data is used as it was")
    if args.out:  # before the models are scored
        if not Path(args.out).resolve().parent.is_dir():
            raise ValueError(f"--out {args.out}: its directory does not exist")
        check_out_file(args.out, "--out", "results JSON file")
    kd = {"divergence": args.divergence, "beta": args.beta, "tau": args.tau, "topk": args.topk}
    if not args.teacher and any(v is not None for v in kd.values()):
        raise ValueError("--divergence, --beta, --tau and --topk describe the divergence to --teacher")
    if args.payload_gib is not None and not (args.teacher and args.payload_gib > 0):
        raise ValueError("--payload-gib bounds the --teacher payloads: it needs --teacher and a positive size")
    results, data = evaluate_models(args.model, data, max_windows=args.max_windows, batch=args.batch,
                                    device=args.device, teacher=args.teacher, kd_overrides=kd,
                                    payload_bytes=None if args.payload_gib is None else int(args.payload_gib * 2**30))
    if args.out:
        write_atomically(args.out, json.dumps(results, indent=1) + "\n")
    first = next(iter(results.values()))
    print(f"data: {', '.join(data.path)}, seq {data.seq_length}, split {list(data.split)}, {data.packing} packing, "
          f"attention within the {data.attention}: {first['windows']} of {first['held_out_windows']} held-out windows, "
          f"{first['tokens']} tokens, {first['target_tokens']} targets")
    print(f"{'model':40s} {'targets':>9s} {'context':>9s} {'all':>9s}" + (f" {'kd':>9s}" if args.teacher else ""))
    for m, r in results.items():
        print(f"{Path(m).name:40s} {_cell(r['targets_loss'])} {_cell(r['context_loss'])} {_cell(r['all_loss'])}"
              + (f" {_cell(r['kd_loss'])}" if args.teacher else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss of checkpoints or HF models on a corpus",
                       description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--model", nargs="+", required=True, help="kdtrain checkpoints or Hugging Face directories")
    p.add_argument("--data", nargs="+", help="indexed dataset prefixes (default: the first checkpoint's run data)")
    p.add_argument("--seq-length", type=int, help="with --data: the run's data.seq_length")
    p.add_argument("--split", type=float, nargs=2, help="with --data: the run's data.split (default 0.98 0.02)")
    p.add_argument("--seed", type=int, help="with --data: the run's data.seed (default 1234)")
    p.add_argument("--packing", choices=("stream", "documents", "best_fit"),
                   help="with --data: the run's data.packing")
    p.add_argument("--attention", choices=("window", "documents"), help="with --data: the run's data.attention")
    p.add_argument("--tokenizer", help="with --data: checked against the corpus' tokenizer fingerprint")
    p.add_argument("--every-token", action="store_true", help="with --data: ignore the corpus' loss mask")
    p.add_argument("--teacher", help="also each model's divergence to this teacher (checkpoint or HF directory)")
    p.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"),
                   help="with --teacher (default: the run's)")
    p.add_argument("--beta", type=float, help="with --teacher and jsd (default: the run's)")
    p.add_argument("--tau", type=float, help="with --teacher: temperature (default: the run's)")
    p.add_argument("--topk", type=int, help="with --teacher: the teacher's top-k (default: the run's teacher.topk)")
    p.add_argument("--payload-gib", type=float,
                   help="with --teacher: host memory for its payloads at once (default: half the available)")
    p.add_argument("--max-windows", type=int, help="only the first N held-out windows (a run scores its first "
                   "eval_batches x global_batch_size)")
    p.add_argument("--batch", type=int, default=8, help="held-out windows per forward (default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: GPU when there is one")
    p.add_argument("--out", help="also write the results as JSON")
    p.set_defaults(func=_run)
