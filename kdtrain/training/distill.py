"""Distillation: a lean teacher streams top-k payloads to a trained student (scripts/distill_gpt.py).

Data flow of one step t (global samples [t*G, (t+1)*G), N = G/m micro-batches):

    teacher replica d_t:  for o in pairing.teacher_work(d_t):   micro-batch o -> forward -> top-k
                          payload -> channel.put(o)              (last stage; runs up to `depth` ahead)
    student replica d_s:  channel.post(own sequence numbers);  1F1B over its micro-batches, where
                          the loss of micro-batch o = KD(student logits, channel.get(o)) (+ alpha CE);
                          DP gradient all-reduce, clip, AdamW; log; checkpoint.

Colocated roles run both halves on every rank, teacher first; disaggregated roles run them on
disjoint ranks at the same time. Every rank builds both roles' process groups (collective), and
where a rank can idle while others work alone (on-policy steps, a disaggregated split) one world
group for those waits (``IdleWaits``: the on-policy hand-off, the students' saves, held-out
passes and cached steps), bounded by ``distributed.idle_timeout_s``.

Logged per step besides the student's loss and throughput: ``teacher_wait_s`` (the student's last
stage blocked on a payload, the longest of the student's ranks), ``student_wait_s`` (a teacher rank
blocked handing a payload over), ``teacher_compute_s`` and ``teacher_busy`` (its share of the step;
timed on other ranks over their own intervals than the step, it can read slightly above 1),
teacher TFLOP/s and MFU, and payload bytes/s. The teacher-side figures are means over the teacher
ranks (payload bytes: their total) and the steps since the last log line; they reach the logging rank by one small world
all-reduce on logging steps, which a teacher-only rank (disaggregated) starts without waiting for
it: the teacher goes on serving the next step while the students finish theirs (waiting would hold
it at every logging step, i.e. every step with the default ``logging.interval: 1``). Losses, rates
and waits are the means of the steps since the last line; counts are theirs: ``teacher_live``
(steps a live teacher served) and, with on-policy steps, ``onpolicy`` (the on-policy steps),
``sample_s`` and ``sampled_tokens`` (their sampling time and the student's tokens they trained on,
in all). Held-out records (``evaluate_distill``, every rank): the student's
cross entropy and, with a live teacher, its divergence to the teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..cache.source import CachedPayloads
from ..config import to_dict
from ..config.distill import DistillConfig
from ..config.inert import inert_settings
from ..loss import agree_impl, kd_loss
from ..models import transformer_engine_layers
from ..parallel import RoleLayout, agreed, build_role_groups, init_distributed, raise_together
from ..stream import Pairing, PayloadSpec
from ..stream.channel import PayloadChannel
from .auto_split import device_profile, resolve_auto_split
from .batches import MicroBatch, make_microbatch, microbatches, replica_sample_ids, stack_rows
from .idle_waits import IdleWaits
from .logger import start_logger
from .metrics import IntervalSums, Throughput, peak_tflops
from .onpolicy import check_sampling_time, check_stop_token, onpolicy_step, sampled_windows
from .optimizer import lr_at
from .pretrain import (Start, build_trainable, check_output_dirs, describe_dataset, describe_start, evaluate, held_out,
                       in_background, lm_forward_step, open_dataset, resolve_dtype, restore_role, save_due, save_role)
from .profiling import StepProfiler
from .resume import run_record
from .step import SkippedSteps, eval_step, train_step
from .stop_requests import start_stops, stop_reason
from .teacher import Teacher, TeacherSideStats
from .teacher_source import cache_steps, live_teacher_step, open_cache, teacher_record

KD_REPORT_KEYS = ("loss_sum", "kd_sum", "ce_sum", "tokens")
_KD_IMPL_NAMES = {"fused": "fused CUDA kernels", "reference": "pure-torch reference",
                  "emulated": "the kernels' algorithm emulated in torch"}


@dataclass
class SeqMicroBatch(MicroBatch):
    seq: int = -1  # sequence number in the step (see stream/pairing.py)


def kd_forward_step(channel, upcoming: deque, cfg: DistillConfig, tp_group, timers: dict, loss_cfg=None):
    """Student forward step: logits -> KD loss against the teacher payload from ``channel`` (a
    PayloadChannel for a live teacher, a CachedPayloads for cached steps); ``loss_cfg`` replaces
    ``cfg.loss`` (on-policy steps drop the hard-label term)."""
    vocab = cfg.student.model.vocab_size
    loss_cfg = cfg.loss if loss_cfg is None else loss_cfg

    def forward_step(model, mb: SeqMicroBatch):
        output = mb.forward(model)

        def loss_func(logits_SBVl: torch.Tensor, total_tokens):
            t0 = time.perf_counter()
            payload = channel.get(mb.seq, mb.tokens, verify=False)
            timers["teacher_wait_s"] += time.perf_counter() - t0
            assert upcoming and upcoming[0] == mb.seq, (mb.seq, list(upcoming)[:4])  # taken in order
            upcoming.popleft()
            channel.post(upcoming)  # keep `depth` receives in flight
            # Normalised by the step's global token count inside the loss, so the fused kernel's
            # gradient (computed in the forward) is final and backward does not rescale it.
            # The payload's checksum and value checks stay on the device until train_step reads
            # them after the step's last backward: a host sync per micro-batch would stop the host
            # from queueing work ahead of the GPU (the kernels ignore out-of-range ids, so a bad
            # payload cannot fault before the check raises, and the update is not applied).
            # With target flags the logits, and the payload rows read, are the targets' only.
            at = mb.at_logit_rows
            loss, report = kd_loss(
                logits_SBVl, at(payload.ids), at(payload.values), vocab_size=vocab, tp_group=tp_group,
                config=loss_cfg, labels_SB=at(mb.labels.t()), loss_mask_SB=at(mb.loss_mask.t()),
                num_tokens=total_tokens, teacher_tail_lse_SB=at(payload.tail_lse),
                validate="deferred")
            tokens = mb.loss_mask.sum()
            loss_sum = report["loss_SB"].sum()
            values_check = report["check"]

            def check():
                channel.verify_pending()
                try:
                    values_check()
                except ValueError as e:  # a teacher's NaN, say: name the step, micro-batch and source
                    raise ValueError(f"micro-batch {mb.seq}{channel.where}, payload from {channel.origin(mb.seq)}: "
                                     f"{e}") from None

            return loss, tokens, {"loss_sum": loss_sum, "kd_sum": report["kd_sum"], "ce_sum": report["ce_sum"],
                                  "tokens": tokens, "check": check}

        return output, loss_func

    return forward_step


def sample_ids_of(o: int, pairing: Pairing, first: int, global_batch: int, micro_batch: int) -> tuple[int, ...]:
    """Dataset sample ids of micro-batch (sequence number) ``o`` of the step starting at ``first``."""
    r, j = pairing.student_of(o)
    return tuple(replica_sample_ids(first, global_batch, r, pairing.dp_student)[j * micro_batch:(j + 1) * micro_batch])


def teacher_microbatches(sample, pairing: Pairing, first: int, global_batch: int, micro_batch: int,
                         teacher_replica: int, device, targets=None, positions=None) -> list[tuple[int, MicroBatch]]:
    """(sequence number, micro-batch) pairs a teacher replica serves this step, in order;
    ``sample(g)``: the window of dataset sample ``g``, ``targets(g)`` its label flags (the
    payload then covers those only), ``positions(g)`` its document positions (None, or callables
    returning None: every label, attention over the window)."""
    out = []
    for o in pairing.teacher_work(teacher_replica):
        ids = sample_ids_of(o, pairing, first, global_batch, micro_batch)
        out.append((o, make_microbatch(np.stack([sample(i) for i in ids]), device, stack_rows(targets, ids),
                                       stack_rows(positions, ids))))
    return out


def student_items(sample, targets, positions, first: int, pairing: Pairing, tr, groups,
                  device) -> tuple[list["SeqMicroBatch"], deque]:
    """This student replica's micro-batches of the global batch at ``first`` with their sequence
    numbers, and those numbers (the payloads it will take, in order; taken from the front)."""
    upcoming = deque(pairing.student_work(groups.dp_rank))
    mbs = microbatches(sample, first, tr.global_batch_size, tr.micro_batch_size, groups.dp_rank, groups.layout.dp,
                       device, targets=targets, positions=positions)
    return [SeqMicroBatch(**vars(mb), seq=o) for o, mb in zip(upcoming, mbs)], upcoming


def serve_batch(teacher: Teacher, channel: PayloadChannel, sample, targets, positions, first: int,
                pairing: Pairing, tr, groups, device, stats: Optional[TeacherSideStats] = None) -> None:
    """This teacher replica's micro-batches of the global batch at ``first``, served in order
    into the channel (``stats``: time the forwards and the hand-overs)."""
    for o, mb in teacher_microbatches(sample, pairing, first, tr.global_batch_size, tr.micro_batch_size,
                                      groups.dp_rank, device, targets, positions):
        started = stats.begin() if stats is not None else None
        payload = teacher.serve(mb)
        if stats is not None:
            stats.end(started)
        if payload is not None:
            t1 = time.perf_counter()
            channel.put(o, payload)
            if stats is not None:
                stats.blocked_s += time.perf_counter() - t1


def distill(cfg: DistillConfig) -> dict:
    """Run the distillation job ``cfg`` on this rank (module docstring); returns its summary."""
    with contextlib.ExitStack() as closing:  # the cache reader's thread and the logger's sinks
        return _distill(cfg, closing)


def _distill(cfg: DistillConfig, closing: contextlib.ExitStack) -> dict:
    started = time.monotonic()  # training.exit_duration_min counts from here
    env = init_distributed(cfg.precision.device, cfg.distributed.backend, cfg.distributed.timeout_s)
    plan_lines, inert = [], inert_settings(cfg)  # as given (auto replaces the layouts below)
    if cfg.split.mode == "auto":
        cfg, plan_lines = resolve_auto_split(cfg, env.world_size, env.device)
    spans = cfg.validate(env.world_size)
    tr, dtype = cfg.training, resolve_dtype(cfg.precision.dtype, env.device)
    check_sampling_time(cfg, spans.student, cfg.split.profile or device_profile(env.device), dtype == torch.float32)
    colocated = cfg.split.mode == "colocated"
    # What each rank checks on its own node (its file systems), agreed before the first group is
    # made: a rank failing here alone left the others in the groups' creation, which waits for
    # every rank (disaggregated, in the idle group's: distributed.idle_timeout_s).
    failure = dataset = None
    try:
        check_output_dirs(cfg.logging, cfg.checkpoint)
        dataset = open_dataset(cfg.data, cfg.student.model)
        check_stop_token(dataset, cfg)
    except Exception as e:  # noqa: BLE001 - any failure: the other ranks must not wait for this one
        failure = e
    raise_together(failure, None, lambda rank, shown: f"rank {rank} failed to start: {shown}")

    t_layout = RoleLayout("teacher", spans.teacher_offset, spans.teacher.tp, spans.teacher.pp, spans.teacher.dp)
    s_layout = RoleLayout("student", spans.student_offset, spans.student.tp, spans.student.pp, spans.student.dp)
    t_groups = build_role_groups(t_layout, timeout_s=cfg.distributed.timeout_s)
    s_groups = build_role_groups(s_layout, timeout_s=cfg.distributed.timeout_s)
    # World-collective, like the groups above; only where a rank can idle while others work alone.
    idle = (IdleWaits.create(cfg.distributed.idle_timeout_s) if cfg.onpolicy.fraction > 0 or
            cfg.split.mode == "disaggregated" or cfg.teacher.source == "mixed" else None)

    pairing = Pairing(tr.global_batch_size // tr.micro_batch_size, t_layout.dp, s_layout.dp)
    spec = PayloadSpec(cfg.data.seq_length, tr.micro_batch_size, cfg.teacher.topk,
                       torch.float32 if cfg.teacher.values_dtype == "fp32" else torch.bfloat16)
    # Colocated: a rank serves its teacher micro-batches, then trains; its sends drain at the end
    # of the step and each receive is posted when the student needs it (posted before the
    # teacher's micro-batches, its wait, which NCCL times from the posting, would include them).
    channel = PayloadChannel(pairing, t_layout, s_layout, spec, s_groups.pgc.tp if s_groups.is_member else None,
                             env.device, cfg.split.timeout_s, send_depth=None if colocated else cfg.split.depth,
                             recv_depth=1 if colocated else cfg.split.depth,
                             group_timeout_s=cfg.distributed.timeout_s)

    reader = open_cache(cfg, env.rank, dtype, idle)
    if reader is not None:
        closing.callback(reader.close)
    cached = CachedPayloads(reader, spec, pairing, env.device) if reader is not None else None
    # What the student's checkpoints record, checked when a later job resumes them.
    run = run_record("distill", tr.global_batch_size, cfg.data, **teacher_record(cfg.teacher, reader),
                     loss=to_dict(cfg.loss), topk=cfg.teacher.topk, dtype=str(dtype).removeprefix("torch."),
                     optimizer=to_dict(cfg.optimizer), train_steps=tr.train_steps)
    teacher = student = None
    start, kd_impl, failure = Start(0), None, None
    try:
        if t_groups.is_member and cfg.teacher.source != "cache":
            teacher = Teacher(cfg.teacher.model, t_groups, spec, cfg.loss.tau, cfg.teacher.load, env.device, dtype,
                              tr.seed + 1, compile=cfg.precision.compile, tokenizer=run["tokenizer_fingerprint"])
        if s_groups.is_member:
            # With both precision options the student's layers are graphed and the teacher's
            # compiled (a layer is either; the teacher's no-grad forward is not graphed).
            student = build_trainable(cfg.student.model, s_groups, cfg.optimizer, cfg.data.seq_length,
                                      tr.micro_batch_size, env.device, dtype, tr.seed,
                                      compile=cfg.precision.compile and not cfg.precision.cuda_graphs,
                                      cuda_graphs=cfg.precision.cuda_graphs, recompute=tr.recompute,
                                      use_te=_student_te(cfg, s_layout.tp, env.device))
            ck, load_from = cfg.checkpoint, "checkpoint"
            if cfg.student.load and not ck.load:
                ck, load_from = dataclasses.replace(ck, load=cfg.student.load), "student"
            start = restore_role(ck, cfg.student.model, student, env.rank, run, what=load_from)
            kd_impl = agree_impl(dtype, env.device, spec.k, s_groups.role_group)
    except Exception as e:  # noqa: BLE001 - any failure: the other role's ranks must not wait for this one
        failure = e
    # A role's load failures stop all of its ranks (raise_together over the role), but
    # disaggregated, the other role's ranks would go on into the broadcast below (or the first
    # payload transfer) and wait there until the job's timeout: the whole world agrees here. A rank
    # that failed alone, before its role's agreement (building its model), raises now instead: its
    # role's peers wait for it in that agreement, and its exit ends the job.
    if failure is not None and not any(agreed(failure, g.role_group) for g in (t_groups, s_groups) if g.is_member):
        raise failure
    # Disaggregated, one role may take far longer than the other (a large teacher read from slow
    # storage): the idle group's bound (distributed.idle_timeout_s) applies, not the job's timeout.
    raise_together(failure, idle.group if idle is not None else None,
                   lambda rank, shown: f"rank {rank} failed to start: {shown}")
    # Teacher-only ranks learn the resume step from the student's checkpoint, read by all ranks.
    start_step = _agree_start_step(start.step, s_layout, env.device)

    writer = env.rank == s_layout.rank_offset
    logger = start_logger(cfg.logging, writer, tr.train_steps, start_step, run_config=to_dict(cfg),
                       name=f"{cfg.teacher.model.name}->{cfg.student.model.name}")
    closing.push(logger.closer())
    if inert:
        logger.write(f"settings with no effect in this run: {'; '.join(inert)}")
    if teacher is not None and env.rank == t_layout.rank_offset:
        mem = teacher.memory_report()
        logger_print = print if not writer else logger.write
        logger_print(f"teacher {cfg.teacher.model.name}: {mem['teacher_weight_bytes'] / 2**20:.1f} MiB of weights on "
                     f"rank {env.rank} (a DDP-wrapped trainable copy with Adam would hold "
                     f"{mem['teacher_trainable_equiv_bytes'] / 2**20:.1f} MiB)")
    for line in plan_lines:
        logger.write(line)
    where = (f"cache {cfg.teacher.cache}" if cfg.teacher.source == "cache" else f"tp={t_layout.tp} pp={t_layout.pp} "
             f"dp={t_layout.dp}, ranks {t_layout.ranks.start}-{t_layout.ranks.stop - 1}")
    logger.write(f"kdtrain distill: {cfg.teacher.model.name} ({where}) -> {cfg.student.model.name} "
                 f"(tp={s_layout.tp} pp={s_layout.pp} dp={s_layout.dp}, ranks {s_layout.ranks.start}-"
                 f"{s_layout.ranks.stop - 1}), {cfg.split.mode}, top-{spec.k}, {cfg.loss.divergence}, "
                 f"{str(dtype).removeprefix('torch.')}, "
                 f"attention={_attention(cfg, t_layout.tp, s_layout.tp, env.device)}"
                 f"{_layer_modes(cfg.precision.compile, cfg.precision.cuda_graphs)}"
                 f"{', recomputed student layers' if tr.recompute else ''}")
    if kd_impl is not None:
        logger.write(f"KD loss: {_KD_IMPL_NAMES[kd_impl[0]]} ({kd_impl[1]})")
    logger.write(describe_dataset(dataset, cfg.data))
    covered = cache_steps(cfg, reader) if reader is not None else tr.train_steps
    if cfg.teacher.source == "mixed" and covered < tr.train_steps:
        held = f"steps 1-{covered}" if covered else "no whole step"
        logger.write(f"teacher.cache holds {reader.num_samples} samples ({held}): steps {covered + 1}-"
                     f"{tr.train_steps} run the live teacher")
    if (line := describe_start(cfg.checkpoint, start, tr.train_steps)) is not None:
        logger.write(line)

    tokens_per_step = tr.global_batch_size * cfg.data.seq_length
    seq = cfg.data.seq_length
    peak = peak_tflops(env.device, cfg.logging.peak_tflops)
    s_tp = Throughput(tokens_per_step, tr.global_batch_size, cfg.student.model.flops_per_token(seq),
                      s_layout.num_ranks, peak, env.device)
    teacher_flops = cfg.teacher.model.flops_per_token(seq) / 3  # forward only
    summary: dict = {"start_step": start_step}
    timers = {"teacher_wait_s": 0.0}
    teacher_side = TeacherSideStats(env.device)
    skips = SkippedSteps(tr.max_skipped_steps)
    interval = IntervalSums()
    stops = start_stops(tr, started, lag=1 if colocated else cfg.split.depth + 1, timeout_s=cfg.distributed.timeout_s,
                        closing=closing, group=idle.group if idle is not None else None)

    def settle() -> None:
        # The recording waits for this rank's gloo work that outlives the step (StepProfiler):
        # the stop requests' reductions, and a teacher's sends and its statistics' reduction.
        stops.settle()
        if teacher is not None:
            channel.flush()
            teacher_side.finish()

    profiler = StepProfiler(cfg.logging.profile_steps, cfg.logging.dir, env.rank, env.device, settle=settle)
    closing.callback(profiler.close)
    pending_save = publish = None  # a background save (checkpoint.async_save): published a step later
    step = start_step
    while step < tr.train_steps:
        profiler.begin(step + 1)
        first = step * tr.global_batch_size
        onpolicy = onpolicy_step(step, cfg)
        # A cache holds the data's payloads: steps on the student's samples need the live teacher.
        live = onpolicy or live_teacher_step(step, cfg, reader)
        source = channel if live else cached
        source.where = f" at step {step + 1}"
        if student is not None:
            # A device-wide sync: on a teacher-only rank it would wait for the payloads in flight
            # and the statistics' reduction, holding the teacher to the students' pace.
            s_tp.start()
        timers["teacher_wait_s"] = 0.0
        sample_fn, targets, positions = dataset.train_sample, dataset.train_loss_mask, dataset.train_positions
        loss_cfg = cfg.loss
        if onpolicy:
            t0 = time.perf_counter()
            windows, sampled, doc_pos = sampled_windows(student, dataset, cfg, first, s_groups, env.device, idle)
            timers["sample_s"] = time.perf_counter() - t0
            timers["sampled_tokens"] = int(sampled.sum())
            sample_fn, targets = (lambda g: windows[g - first]), (lambda g: sampled[g - first])
            positions = None if doc_pos is None else (lambda g: doc_pos[g - first])
            loss_cfg = dataclasses.replace(cfg.loss, alpha=0.0)
        s_items, upcoming = [], []
        if student is not None:
            s_items, upcoming = student_items(sample_fn, targets, positions, first, pairing, tr, s_groups, env.device)
            if not live:
                cached.start_step({o: sample_ids_of(o, pairing, first, tr.global_batch_size, tr.micro_batch_size)
                                   for o in upcoming})
            if s_groups.is_last_stage and not (colocated and live):  # colocated: see the channel
                source.post(upcoming)
        if teacher is not None and live:
            serve_batch(teacher, channel, sample_fn, targets, positions, first, pairing, tr, t_groups, env.device,
                        teacher_side)
        result = None
        if student is not None:
            fwd = kd_forward_step(source, upcoming, cfg, s_groups.pgc.tp, timers, loss_cfg)
            lr = lr_at(step, cfg.optimizer, tr.train_steps)
            result = train_step(student.schedule, fwd, s_items, student.grads, student.optimizer, s_groups, lr,
                                cfg.optimizer.clip_grad, cfg.student.model.tie_embeddings, KD_REPORT_KEYS)
        if colocated:
            t0 = time.perf_counter()
            channel.flush()
            teacher_side.blocked_s += time.perf_counter() - t0
        if teacher is not None:
            teacher_side.end_step(channel)
        seconds = s_tp.stop()["step_time_s"] if student is not None else 0.0
        if result is not None:  # the interval's sums: reports, the teacher's live steps, the waits
            interval.add({**result.sums, "live": float(live), "teacher_wait_s": timers["teacher_wait_s"],
                          "onpolicy": float(onpolicy), "sample_s": timers["sample_s"] if onpolicy else 0.0,
                          "sampled_tokens": timers["sampled_tokens"] if onpolicy else 0.0}, seconds)
        step += 1
        stop_why = stop_reason(step, start_step, tr, stops)
        stop_now = stop_why is not None
        profiler.end(step, stopping=stop_now)
        log_now = step % cfg.logging.interval == 0 or step == tr.train_steps or stop_now
        save_now = save_due(cfg.checkpoint, step, tr.train_steps, stop_now)
        if not live and not colocated and idle is not None:
            # A cached step leaves teacher-only ranks nothing to do: they wait for the students here,
            # under the idle bound, rather than run ahead into collectives and sends bounded by
            # distributed.timeout_s and split.timeout_s (any number of cached steps could follow).
            idle.wait(f"waiting while the students train on cached step {step}")
        # collective: every rank, same steps; teacher-only ranks start it without waiting
        t_stats = teacher_side.collect(wait=student is not None) if log_now else {}
        if result is not None:
            summary["train_loss"] = result.sums["loss_sum"] / max(result.sums["tokens"], 1.0)
        if result is not None and (log_now or result.skipped):
            # The steps since the last line: their mean losses, throughput and waits; this step's
            # lr, norm and flags. t_stats are the teacher ranks' means over the same steps, so a
            # skipped step logged between lines reports the interval so far without ending it.
            sums, seconds, steps = interval.take(reset=log_now)
            if s_layout.num_ranks > 1:  # log_now and skipped are alike on every student rank
                # The wait is timed where the loss runs (the last stage); the line takes the
                # longest of any student rank (the logging rank is stage 0 when student.pp > 1).
                wait = torch.tensor([sums["teacher_wait_s"]], dtype=torch.float64, device=env.device)
                dist.all_reduce(wait, op=dist.ReduceOp.MAX, group=s_groups.role_group)
                sums["teacher_wait_s"] = float(wait.item())
            rates = s_tp.rates(seconds, steps)
            n = max(sums["tokens"], 1.0)
            metrics = {"loss": sums["loss_sum"] / n, "kd_loss": sums["kd_sum"] / n, "ce_loss": sums["ce_sum"] / n,
                       "lr": lr, "grad_norm": result.grad_norm, "skipped": int(result.skipped),
                       "consumed_samples": step * tr.global_batch_size, **rates,
                       # cached steps ran no teacher
                       "teacher_tflops_per_device": sums["live"] / steps * teacher_flops * rates["tokens_per_s"]
                       / t_layout.num_ranks / 1e12,
                       "teacher_wait_s": sums["teacher_wait_s"] / steps, "teacher_live": int(sums["live"]),
                       **t_stats}
            if cfg.onpolicy.fraction > 0:  # the interval's on-policy steps and their totals
                metrics.update(onpolicy=int(sums["onpolicy"]), sample_s=sums["sample_s"],
                               sampled_tokens=int(sums["sampled_tokens"]))
            if "teacher_compute_s" in t_stats:
                metrics["teacher_busy"] = t_stats["teacher_compute_s"] / rates["step_time_s"]
                metrics["payload_bytes_per_s"] = t_stats["payload_bytes_per_step"] / rates["step_time_s"]
            if peak:
                metrics["teacher_mfu"] = metrics["teacher_tflops_per_device"] / peak
            logger.log(step, metrics)
        if publish is not None:  # the previous step's save, written while this step trained
            if pending_save is not None:
                pending_save.finish()
                pending_save = None
            _teachers_wait_for_students(cfg, idle, f"waiting while the students publish the step-{publish} checkpoint")
            publish = None
        background = in_background(cfg.checkpoint, step, tr.train_steps, stop_now)
        if result is not None:
            # Before a save: the step that ends a diverged run saves nothing. Teacher-only ranks
            # learn of it as of a dead peer (their next send times out; torchrun stops the job).
            skips.update(step, result)
            if save_now:
                pending_save = save_role(cfg.checkpoint, cfg.student.model, student, step, run, background)
        if save_now:
            _teachers_wait_for_students(cfg, idle, f"waiting while the students save the step-{step} checkpoint")
            publish = step if background else None
        if tr.eval_interval and step % tr.eval_interval == 0 and step < tr.train_steps:  # every rank: teachers serve
            valid = evaluate_distill(student, teacher, channel, pairing, dataset, cfg, s_groups, t_groups, env.device,
                                     idle)
            if student is not None:
                logger.log(step, valid, kind="valid")
        if stop_now:  # the same step on every rank (start_step is agreed), teacher ranks included
            logger.write(f"{stop_why}: stopping after step {step}")
            break
    stops.finish()
    assert pending_save is None  # the last save, and a stopping job's, are written in the foreground
    final = {}
    if step == tr.train_steps:
        final = evaluate_distill(student, teacher, channel, pairing, dataset, cfg, s_groups, t_groups, env.device,
                                 idle)
    channel.flush()
    teacher_side.finish()
    if student is not None:
        if final:
            logger.log(step, final, kind="valid")
        summary.update(final)
        summary["skipped_steps"] = skips.total
        if skips.total:
            logger.write(f"{skips.total} step(s) of this job skipped for a non-finite gradient norm")
    summary["step"] = step
    return summary


def _student_te(cfg: DistillConfig, tp: int, device: torch.device) -> bool:
    """Whether the student gets Transformer Engine layers: as build_gpt picks them, except for a
    student that samples on-policy, which decodes with the key/value cache of kdtrain's local
    layers (models/generate.py; with TE layers every new token re-ran the whole prefix and
    computed logits at every position of it)."""
    return cfg.onpolicy.fraction == 0 and transformer_engine_layers(cfg.student.model, tp, device)


def _attention(cfg: DistillConfig, t_tp: int, s_tp: int, device: torch.device) -> str:
    """The roles' attention as build_gpt picks it, for the start-up line."""
    name = {True: "transformer-engine", False: "sdpa"}
    student = name[_student_te(cfg, s_tp, device)]
    if cfg.teacher.source == "cache":
        return student
    teacher = name[transformer_engine_layers(cfg.teacher.model, t_tp, device, trains=False)]
    return student if teacher == student else f"{teacher} (teacher), {student} (student)"


def _layer_modes(compile: bool, cuda_graphs: bool) -> str:
    """How the roles' layers run, for the start-up line."""
    if compile and cuda_graphs:
        return ", compiled teacher layers, CUDA-graphed student layers"
    return (", compiled layers" if compile else "") + (", CUDA-graphed student layers" if cuda_graphs else "")


def evaluate_distill(student, teacher, channel: PayloadChannel, pairing: Pairing, dataset, cfg: DistillConfig,
                     s_groups, t_groups, device, idle: Optional[IdleWaits]) -> dict:
    """The student's held-out metrics; every rank calls it at the same steps.

    ``valid_loss`` / ``valid_ppl``: next-token cross entropy over the held-out targets (as in
    pretraining). ``valid_kd_loss``: the run's divergence to the live teacher on the same windows,
    per target token, at the teacher's top-k like the training ``kd_loss``: each held-out global
    batch goes through the step's machinery (the teacher replicas serve its micro-batches over
    the channel, the student runs them forward only). Runs without a live teacher
    (``teacher.source: cache``) report only the first two."""
    out = {}
    if student is not None:
        out.update(evaluate(student, dataset, cfg.training, lm_forward_step(cfg.student.model.vocab_size,
                                                                            s_groups.pgc.tp), device))
    tr = cfg.training
    n_valid = dataset.num_valid_windows
    if cfg.teacher.source == "cache" or n_valid == 0 or tr.eval_batches == 0:
        return out
    _teachers_wait_for_students(cfg, idle, "waiting while the students run the held-out pass")  # the pass above
    batches, sample, targets, positions = held_out(dataset, tr)
    sums = dict.fromkeys(KD_REPORT_KEYS, 0.0)
    sent = channel.bytes_sent  # the held-out payloads are not a training step's traffic
    if student is not None:
        student.model.eval()
    for b in range(batches):
        first = b * tr.global_batch_size
        channel.where = f" in held-out batch {b + 1}"
        items, upcoming = [], []
        if student is not None:
            items, upcoming = student_items(sample, targets, positions, first, pairing, tr, s_groups, device)
            if s_groups.is_last_stage and cfg.split.mode != "colocated":  # colocated: posted when needed
                channel.post(upcoming)
        if teacher is not None:
            serve_batch(teacher, channel, sample, targets, positions, first, pairing, tr, t_groups, device)
        if student is not None:
            fwd = kd_forward_step(channel, upcoming, cfg, s_groups.pgc.tp, {"teacher_wait_s": 0.0})
            for k, v in eval_step(student.schedule, fwd, items, s_groups, KD_REPORT_KEYS).items():
                sums[k] += v
        if cfg.split.mode == "colocated":
            channel.flush()
    channel.bytes_sent = sent
    if student is not None:
        student.model.train()
        out["valid_kd_loss"] = sums["kd_sum"] / max(sums["tokens"], 1.0)
    return out


def _teachers_wait_for_students(cfg: DistillConfig, idle: Optional[IdleWaits], what: str) -> None:
    """Disaggregated teacher ranks wait here (``idle``) while the students work alone (a checkpoint
    save, the held-out LM pass): else they would wait in their next send, whose bound split.timeout_s
    is meant for a peer that died, and a slow save would end the job as one."""
    if cfg.split.mode == "disaggregated":
        idle.wait(what)


def _agree_start_step(start_step: int, s_layout: RoleLayout, device) -> int:
    """Every rank takes the student's resume step (a world broadcast from the student's first rank)."""
    t = torch.tensor([start_step], dtype=torch.int64, device=device)
    dist.broadcast(t, src=s_layout.rank_offset)
    return int(t.item())

