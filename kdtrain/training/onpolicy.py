"""On-policy steps: which steps sample, what the student writes in each window (the replies of
conversations, or the rest of a document after its prompt), the sampling itself, and the start-up
check that its planned time fits the run's bound on idle waits."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config.distill import DistillConfig, OnPolicyConfig
from ..config.loader import field_error
from ..data.gpt_dataset import GPTWindowDataset
from .batches import replica_sample_ids


def spread_step(step: int, fraction: float) -> bool:
    """Whether ``step`` is one of a ``fraction`` of the steps spread evenly: floor((t+1) f) >
    floor(t f), in exact arithmetic on the fraction as written (0.29 is 29/100: in floats
    29 * 0.29 < 8.41 would lose a step in 100)."""
    f = Fraction(repr(fraction))
    return f > 0 and math.floor((step + 1) * f) > math.floor(step * f)


def onpolicy_step(step: int, cfg: DistillConfig) -> bool:
    """Whether the student samples the sequences of ``step`` (``onpolicy.fraction`` of the steps,
    spread evenly like the mixed teacher's live steps; the same answer on every rank)."""
    return spread_step(step, cfg.onpolicy.fraction)


def sampled_windows(student, dataset: GPTWindowDataset, cfg: DistillConfig, first: int, groups, device,
                    idle) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The step's windows [G, seq + 1] with the student's samples written in (models/generate.py),
    the label flags [G, seq] of the sampled tokens and, with attention within documents, the new
    windows' document positions [G, seq + 1] (else None), on every rank.

    What is sampled (OnPolicyConfig): after each window's first ``onpolicy.prompt_length`` tokens,
    or, on conversations, the window's first reply (``onpolicy.replies: all``: every reply), each
    until the stop token, the data's next turn following. Each student replica samples its own
    samples, ``onpolicy.sample_batch`` rows per call (all of them when 0), all its pipeline stages
    together (with ``precision.cuda_graphs`` each position's forward replays as one CUDA graph,
    models/decode_graph.py); one world all-reduce (tensor rank 0 of each student replica's last
    stage contributes, every other rank adds zeros) hands every rank the whole step with the flags,
    since a teacher replica serves other replicas' samples. A disaggregated teacher waits for the
    step's samples (on-policy steps cannot run ahead), and replicas that finish first for the
    slowest: that wait goes through ``idle`` (training/idle_waits.py, bounded by
    ``distributed.idle_timeout_s``), so the all-reduce starts with every rank there. The sampling
    is keyed by sample id, so the windows do not depend on the layout. ``student`` is None on
    teacher-only ranks."""
    from ..models.generate import DecodeStages, sample_replies

    tr, op = cfg.training, cfg.onpolicy
    G, length = tr.global_batch_size, cfg.data.seq_length + 1
    stop = stop_id(dataset, op) if dataset.conversations else None
    documents = cfg.data.attention == "documents"
    # Per sample: the window, its sampled flags, and its document positions.
    out = torch.zeros(G, (3 if documents else 2) * length, dtype=torch.long, device=device)
    ids = replica_sample_ids(first, G, groups.dp_rank, groups.layout.dp) if student is not None else range(0)
    rows = op.sample_batch or max(1, len(ids))
    for i in range(0, len(ids), rows):
        chunk = ids[i:i + rows]
        windows = torch.from_numpy(np.stack([dataset.train_sample(g) for g in chunk])).to(device)
        positions = (torch.from_numpy(np.stack([dataset.train_positions(g) for g in chunk])).to(device)
                     if documents else None)
        spans = onpolicy_spans(dataset, chunk, op, length)
        seqs, flags, new_pos = sample_replies(
            student.model, windows, spans, vocab_size=cfg.student.model.vocab_size, temperature=op.temperature,
            seed=tr.seed, sample_ids=chunk, stop_token=stop, pad_id=dataset.eos_id or 0, tp_group=groups.pgc.tp,
            top_k=op.top_k, top_p=op.top_p, positions=positions, stages=DecodeStages.of(groups),
            graphs=cfg.precision.cuda_graphs)
        if groups.tp_rank == 0 and groups.is_last_stage:  # every stage holds the same rows
            out[chunk.start - first:chunk.stop - first] = torch.cat(
                [seqs, flags.long()] + ([new_pos] if documents else []), dim=1)
    idle.wait(f"the on-policy hand-off of step {first // G + 1} (every rank waits for the students' samples)")
    dist.all_reduce(out)
    out = out.cpu().numpy()
    # Label i predicts token i + 1: a sampled token t is the label t - 1.
    return out[:, :length], out[:, length + 1:2 * length].astype(bool), out[:, 2 * length:] if documents else None


def onpolicy_spans(dataset, ids, op: OnPolicyConfig, length: int) -> list[list[tuple[int, int]]]:
    """Per train sample of ``ids``, the token ranges of its window the student writes on an
    on-policy step: the replies that start in it on conversations (the first, or all), else all
    after the first ``op.prompt_length`` tokens; each window by its own corpus (a blend may mix
    conversations and documents)."""
    spans = [dataset.train_reply_spans(g) if dataset.train_is_conversation(g)
             else [(op.prompt_length, length)] for g in ids]
    return spans if op.replies == "all" else [row[:1] for row in spans]


def check_stop_token(dataset, cfg: DistillConfig, windows: int = 64) -> None:
    """On conversations, the stop token must end the corpus' replies: else the student never stops
    and writes to the end of every window, the data's next turns pushed out (a base model's
    tokenizer names ``<|endoftext|>`` as EOS while its chat template ends turns with
    ``<|im_end|>``). Looks at the replies of the first ``windows`` training windows that hold
    conversations; ValueError naming ``onpolicy.stop_token`` and the ids the replies end with."""
    op = cfg.onpolicy
    if op.fraction == 0 or not dataset.conversations or op.stop_token == -1:  # -1: asked never to stop
        return
    stop = stop_id(dataset, op)
    ends: Counter = Counter()
    replies = holding = 0
    for g in range(min(dataset.num_train_windows, 4 * windows)):
        if holding >= windows:
            break
        if not dataset.train_is_conversation(g):
            continue
        spans = dataset.train_reply_spans(g)
        if not spans:
            continue
        holding += 1
        window = dataset.train_sample(g)
        for a, b in spans:
            if b < len(window):  # a reply the window cuts says nothing about how it ends
                replies += 1
                reply = window[a:b].tolist()
                if stop is not None and stop in reply:
                    return
                ends.update(reply[-2:])
    if replies == 0:
        return
    if stop is None:  # unset, and the corpus records no EOS id
        named = "unset, and the corpus records no EOS id to stop at: none"
    else:
        named = f"unset, and the corpus' EOS id {stop}" if op.stop_token is None else f"id {stop}"
    common = ", ".join(str(i) for i, _ in ends.most_common(3))
    raise ValueError(f"onpolicy.stop_token: {named} occurs in none of the {replies} whole replies of the "
                     f"first {holding} training windows with replies, so a sampled reply would never stop; set "
                     f"onpolicy.stop_token to the id that ends a turn (the replies end with ids {common}), "
                     f"or -1 to write to the window's end")


def stop_id(dataset, op: OnPolicyConfig) -> Optional[int]:
    """The id that ends a sampled reply (``onpolicy.stop_token``, else the corpus' EOS id), None for
    none (-1, or a corpus without an EOS id)."""
    stop = dataset.eos_id if op.stop_token is None else op.stop_token
    return None if stop is None or stop < 0 else stop


def check_sampling_time(cfg: DistillConfig, student, profile: str, fp32: bool) -> None:
    """Where a rank waits through an on-policy step's sampling (disaggregated teacher ranks, or the
    first of several colocated student replicas to finish), the planner's estimate of that sampling
    (planner/timing.py ``sampling_time``: a student replica's rows of the step, ``onpolicy.sample_batch``
    per call, on the planner profile ``profile``) must fit in ``distributed.idle_timeout_s``, the
    bound on that wait: ValueError naming both figures otherwise. ``student``: the resolved student
    layout (a ParallelConfig); ``fp32``: the run computes in fp32 (else bf16)."""
    op, bound = cfg.onpolicy, cfg.distributed.idle_timeout_s
    if op.fraction == 0 or (cfg.split.mode == "colocated" and student.dp == 1):
        return  # one student replica on every rank: all of them sample, none waits
    from ..planner import get_profile
    from ..planner.memory import ModelShape
    from ..planner.problem import Sampling
    from ..planner.timing import sampling_time

    seq = cfg.data.seq_length
    prompt = min(op.prompt_length, seq)
    rows, calls = Sampling(op.fraction, prompt, op.sample_batch).calls(cfg.training.global_batch_size // student.dp)
    prof = get_profile(profile, "split.profile")
    estimate = sampling_time(ModelShape.of(cfg.student.model), student.tp, student.pp, seq, rows, calls, prompt, prof,
                             4 if fp32 else 2, graphed=cfg.precision.cuda_graphs)
    error = None
    if estimate > bound:
        shown = f"{estimate:.0f}" if estimate >= 10 else f"{estimate:.2g}"
        error = (f"{bound:g} s is shorter than an on-policy step's sampling, which other ranks wait through: the "
                 f"planner estimates {shown} s ({calls} call(s) of {rows} rows per student replica, up to "
                 f"{seq + 1 - prompt} positions each, student {cfg.student.model.name} tp={student.tp} "
                 f"pp={student.pp}, profile {prof.name}); raise distributed.idle_timeout_s above it")
    # Each rank's profile is its own device's (without split.profile): ranks of other GPUs could
    # decide apart, and a rank that raised alone would leave the others waiting in the next
    # collective. Every rank raises the first error any rank found.
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise field_error("distributed", "idle_timeout_s", error)
