"""Pretraining of one GPT with TP x PP x DP (the entry point behind scripts/pretrain_gpt.py)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import CheckpointConfig, DataConfig, ModelConfig, PretrainConfig, TrainingConfig, to_dict
from ..config.inert import inert_settings
from ..data import BlendedWindowDataset, GPTWindowDataset, Tokenizer
from ..data.gpt_dataset import check_same_tokenizer
from ..data.mock import MockWindowDataset
from ..loss import vocab_parallel_cross_entropy
from ..models import KDGPTModel, build_gpt, transformer_engine_layers
from ..models.cuda_graphs import capture_layer_graphs
from ..parallel import RoleGroups, RoleLayout, build_role_groups, init_distributed, raise_together
from .batches import MicroBatch, microbatches
from .checkpoint import CheckpointReader, PendingSave, start_save
from .checkpoint_load import check_checkpoint_model, load_model_weights, load_training_state, restore_rng
from .grads import GradBuffer
from .logger import start_logger
from .metrics import IntervalSums, Throughput, peak_tflops
from .optimizer import AdamWOptimizer, lr_at
from .pipeline import ForwardStep, PipelineSchedule
from .profiling import StepProfiler
from .replica_reads import Replicas
from .resume import check_output_dir, check_resume, refuse_other_runs, run_record
from .step_dirs import check_latest_marker, latest_checkpoint
from .step import SkippedSteps, eval_step, train_step
from .stop_requests import start_stops, stop_reason

LM_REPORT_KEYS = ("loss_sum", "tokens")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def lm_forward_step(vocab_size: int, tp_group) -> ForwardStep:
    """Next-token cross entropy on vocab-parallel logits (Megatron-LM's forward_step contract)."""

    def forward_step(model: KDGPTModel, mb: MicroBatch):
        output = mb.forward(model)  # last stage: logits [s, b, V/tp], or [n, 1, V/tp] at the targets

        def loss_func(logits_SBVl: torch.Tensor, total_tokens):
            # Logits at the targets' rows only when the micro-batch has target flags: [n, 1, V/tp].
            losses_SB = vocab_parallel_cross_entropy(logits_SBVl, mb.at_logit_rows(mb.labels.t()), vocab_size,
                                                     tp_group)
            mask_SB = mb.at_logit_rows(mb.loss_mask.t())
            loss_sum = (losses_SB * mask_SB).sum()
            num_tokens = mask_SB.sum()
            return loss_sum / total_tokens, num_tokens, {"loss_sum": loss_sum.detach(), "tokens": num_tokens}

        return output, loss_func

    return forward_step


def open_dataset(data: DataConfig, model: ModelConfig):
    if data.mock:  # data.split[1] == 0 asks for no held-out windows, as it does of a corpus
        return MockWindowDataset(data.seq_length, model.vocab_size, data.seed,
                                 num_valid=1024 if data.split[1] > 0 else 0)
    tokenizer = {}  # the corpora are checked against it
    if data.tokenizer:
        tok = Tokenizer(data.tokenizer)
        if tok.vocab_size > model.vocab_size:
            raise ValueError(f"data.tokenizer {data.tokenizer} has {tok.vocab_size} ids but model "
                             f"{model.name!r} has vocab_size={model.vocab_size}")
        tokenizer = dict(tokenizer_fingerprint=tok.fingerprint, tokenizer_name=f"data.tokenizer ({data.tokenizer})")
    if data.weights is None:
        return GPTWindowDataset(data.path, data.seq_length, split=tuple(data.split), seed=data.seed,
                                vocab_size=model.vocab_size, loss_mask=data.loss_mask, **tokenizer,
                                packing=data.packing, document_positions=data.attention == "documents")
    # Weighted corpora: each its own windows, split and shuffle (seeded apart), mixed by blend.py;
    # a corpus too small for a held-out window trains only (the evaluation reads the others).
    parts = [GPTWindowDataset([p], data.seq_length, split=tuple(data.split), seed=data.seed + i,
                              vocab_size=model.vocab_size, loss_mask=data.loss_mask, **tokenizer,
                              packing=data.packing, document_positions=data.attention == "documents",
                              require_held_out=False)
             for i, p in enumerate(data.path)]
    check_same_tokenizer([s for part in parts for s in part.streams])
    if data.split[1] > 0 and not any(part.num_valid_windows for part in parts):
        raise ValueError(f"data.split: held-out share {data.split[1]} requested, but none of the corpora "
                         f"{list(data.path)} gets a held-out window; use larger corpora, a larger held-out "
                         "fraction or split[1]=0")
    return BlendedWindowDataset(parts, data.weights)


def describe_dataset(dataset, data: DataConfig) -> str:
    """One log line: windows, packing and what the targets are."""
    if data.mock:
        ignored = [f"data.{k}" for k in ("path", "weights", "tokenizer") if getattr(data, k)]
        if data.packing != "stream":
            ignored.append("data.packing")
        return (f"data: mock tokens, seq {data.seq_length}, {dataset.num_valid_windows} held-out windows"
                + (f" ({', '.join(ignored)} not used)" if ignored else ""))
    line = (f"data: {dataset.num_train_windows} train / {dataset.num_valid_windows} held-out windows of "
            f"{data.seq_length} tokens")
    if data.packing != "stream":
        how = "best fit" if data.packing == "best_fit" else "in corpus order"
        line += f", whole documents per window, {how} ({100 * dataset.padding_share:.1f}% padding"
        if dataset.cut_documents:  # a long document's later pieces lose the context before them
            line += f", {dataset.cut_documents} pieces continue a document cut at a window's end"
        line += ")"
    if dataset.conversations:
        line += ", conversations: the replies are the targets"
    if data.attention == "documents":
        line += ", attention within documents"
    return line


@dataclass
class Role:
    """One trainable model with everything needed to step it."""

    groups: RoleGroups
    model: KDGPTModel
    grads: GradBuffer
    optimizer: AdamWOptimizer
    schedule: PipelineSchedule

    @property
    def params(self):
        return self.optimizer.params


def check_fits(model_cfg: ModelConfig, groups: RoleGroups, device: torch.device, dtype: torch.dtype,
               trained: bool = False, distributed_optimizer: bool = False) -> None:
    """Refuse, before allocating, a role whose part of the model cannot fit on some rank's device:
    its weights, and when ``trained`` their fp32 gradients and optimizer state (the planner's exact
    static bytes, kdtrain/planner/memory.py), against the device's free memory now (a colocated
    teacher built first is in use). Activations are not counted: this only stops what cannot
    start, with a message instead of an allocator's error deep in model construction. Collective
    over the role: devices differ in what is free, and every rank stops alike."""
    from ..parallel import free_memory_bytes
    from ..planner.memory import ModelShape, stage_params, student_stage_memory

    free, error = free_memory_bytes(device), None
    m, lay, r = ModelShape.of(model_cfg), groups.layout, groups.pp_rank
    d = torch.empty((), dtype=dtype).element_size()
    if trained:
        need = student_stage_memory(m, lay.tp, lay.pp, lay.dp, r, 1, 1, 1, d=d,
                                    distributed_optimizer=distributed_optimizer).static
    else:
        need = d * stage_params(m, lay.tp, lay.pp, r)
    if free is not None and need > free:
        parts = "weights, fp32 gradients and optimizer state" if trained else "weights"
        error = ValueError(
            f"{lay.name} {model_cfg.name}: a rank of pipeline stage {r} (tp={lay.tp}, pp={lay.pp}, dp={lay.dp}) needs "
            f"{need / 2**30:.2f} GiB for its {parts} alone, and {device} has {free / 2**30:.2f} GiB free: split the "
            "model over more ranks (a larger tp or pp" + (", optimizer.distributed with dp > 1" if trained else "")
            + "), use a smaller model or a larger device")
    groups.raise_together(error, "does not fit on its device")


def build_trainable(model_cfg: ModelConfig, groups: RoleGroups, optimizer_cfg, seq_length: int,
                    micro_batch: int, device: torch.device, dtype: torch.dtype, seed: int,
                    compile: bool = False, cuda_graphs: bool = False, recompute: bool = False,
                    use_te: Optional[bool] = None) -> Role:
    check_fits(model_cfg, groups, device, dtype, trained=True, distributed_optimizer=optimizer_cfg.distributed)
    model = build_gpt(model_cfg, groups, device=device, dtype=dtype, seed=seed, compile=compile,
                      cuda_graphs=cuda_graphs, recompute=recompute, use_te=use_te)
    # Dropout draws from the process's global generators (CPU and CUDA): seeded from the run's
    # seed, one stream per pipeline stage and the same on every tensor rank of a stage, whose
    # hidden dropout after a row-parallel all-reduce must drop the same elements of the same
    # replicated activations (unseeded, the copies of the norm weights drifted apart); attention
    # dropout forks it per tensor rank (models/attention.py). A resume restores the saved state
    # over it (restore_role).
    torch.manual_seed(seed + 100 * groups.pp_rank)
    if cuda_graphs:  # now, before any other thread uses the device (see models/cuda_graphs.py)
        capture_layer_graphs(model, micro_batch, seq_length)
    grads = GradBuffer(model, model.param_specs, shard_group=groups.pgc.dp if optimizer_cfg.distributed else None)
    params = [(model.param_specs[n], p) for n, p in model.named_parameters()]
    optimizer = AdamWOptimizer(params, optimizer_cfg, groups.pgc.dp, grads)
    schedule = PipelineSchedule(model, groups, (seq_length, micro_batch, model_cfg.hidden_size), dtype, device)
    return Role(groups, model, grads, optimizer, schedule)


def held_out(dataset, t: TrainingConfig) -> tuple[int, Callable, Callable, Callable]:
    """(global batches, window, target flags, document positions of held-out sample j) of one
    evaluation: ``t.eval_batches`` batches, fewer when the held-out windows fill fewer. Each of a
    corpus' windows counts once: the samples that pad the last batch past the held-out windows
    repeat the first ones with no target, so they weigh nothing in the losses. A blend's held-out
    samples follow its weights over its corpora's held-out windows (blend.py): a weighted sample,
    in which a corpus with more weight than windows repeats some and another may leave some out."""
    n, g = dataset.num_valid_windows, t.global_batch_size
    batches = min(t.eval_batches, -(-n // g))
    labels = len(dataset.valid_sample(0)) - 1 if batches * g > n else 0  # per window, when some repeat

    def targets(j: int) -> Optional[np.ndarray]:
        mask = dataset.valid_loss_mask(j % n)
        if not labels:
            return mask
        mask = np.ones(labels, dtype=bool) if mask is None else mask.copy()
        if j >= n:
            mask[:] = False
        return mask

    return (batches, lambda j: dataset.valid_sample(j % n), targets, lambda j: dataset.valid_positions(j % n))


def evaluate(role: Role, dataset: GPTWindowDataset, t: TrainingConfig, forward_step, device) -> dict:
    n_valid = dataset.num_valid_windows
    if n_valid == 0 or t.eval_batches == 0:
        return {}
    sums = {k: 0.0 for k in LM_REPORT_KEYS}
    batches, sample, targets, positions = held_out(dataset, t)
    role.model.eval()
    for b in range(batches):
        mbs = microbatches(sample, b * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                           role.groups.dp_rank, role.groups.layout.dp, device, targets=targets, positions=positions)
        for k, v in eval_step(role.schedule, forward_step, mbs, role.groups, LM_REPORT_KEYS).items():
            sums[k] += v
    role.model.train()
    loss = sums["loss_sum"] / max(sums["tokens"], 1.0)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50.0))}


def pretrain(cfg: PretrainConfig) -> dict:
    """Run the pretraining job ``cfg`` on this rank; returns its summary."""
    with contextlib.ExitStack() as closing:  # the logger's sinks
        return _pretrain(cfg, closing)


def _pretrain(cfg: PretrainConfig, closing: contextlib.ExitStack) -> dict:
    started = time.monotonic()  # training.exit_duration_min counts from here
    env = init_distributed(cfg.precision.device, cfg.distributed.backend, cfg.distributed.timeout_s)
    cfg.validate(env.world_size)
    par, t = cfg.parallel, cfg.training
    dtype = resolve_dtype(cfg.precision.dtype, env.device)
    # What each rank checks on its own node, agreed before the groups' creation waits for all.
    error = dataset = None
    try:
        check_output_dirs(cfg.logging, cfg.checkpoint)
        dataset = open_dataset(cfg.data, cfg.model)
    except Exception as e:  # noqa: BLE001 - any failure: the other ranks must not wait for this one
        error = e
    raise_together(error, None, lambda rank, shown: f"rank {rank} failed to start: {shown}")
    groups = build_role_groups(RoleLayout("model", 0, par.tp, par.pp, par.dp), timeout_s=cfg.distributed.timeout_s)
    role = build_trainable(cfg.model, groups, cfg.optimizer, cfg.data.seq_length, t.micro_batch_size,
                           env.device, dtype, t.seed, compile=cfg.precision.compile,
                           cuda_graphs=cfg.precision.cuda_graphs, recompute=t.recompute)
    forward_step = lm_forward_step(cfg.model.vocab_size, groups.pgc.tp)

    run = run_record("pretrain", t.global_batch_size, cfg.data, dtype=str(dtype).removeprefix("torch."),
                     optimizer=to_dict(cfg.optimizer), train_steps=t.train_steps)
    start = restore_role(cfg.checkpoint, cfg.model, role, env.rank, run)
    start_step = start.step
    writer = env.rank == 0
    logger = start_logger(cfg.logging, writer, t.train_steps, start_step, run_config=to_dict(cfg), name=cfg.model.name)
    closing.push(logger.closer())
    if inert := inert_settings(cfg):
        logger.write(f"settings with no effect in this run: {'; '.join(inert)}")
    logger.write(
        f"kdtrain pretrain: {cfg.model.name} ({cfg.model.num_params() / 1e6:.1f}M params, padded vocab "
        f"{cfg.model.padded_vocab_size(par.tp)}), tp={par.tp} pp={par.pp} dp={par.dp} on {env.world_size} "
        f"{env.device.type} rank(s), {str(dtype).removeprefix('torch.')}, attention="
        f"{'transformer-engine' if transformer_engine_layers(cfg.model, par.tp, env.device) else 'sdpa'}"
        f"{', compiled layers' if cfg.precision.compile else ''}"
        f"{', CUDA-graphed layers' if cfg.precision.cuda_graphs else ''}"
        f"{', recomputed layers' if t.recompute else ''}, start step {start_step}")
    logger.write(describe_dataset(dataset, cfg.data))
    if (line := describe_start(cfg.checkpoint, start, t.train_steps)) is not None:
        logger.write(line)
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    throughput = Throughput(tokens_per_step, t.global_batch_size, cfg.model.flops_per_token(cfg.data.seq_length),
                            env.world_size, peak_tflops(env.device, cfg.logging.peak_tflops), env.device)
    summary: dict = {"start_step": start_step}
    skips = SkippedSteps(t.max_skipped_steps)
    interval = IntervalSums()
    stops = start_stops(t, started, lag=1, timeout_s=cfg.distributed.timeout_s, closing=closing)
    profiler = StepProfiler(cfg.logging.profile_steps, cfg.logging.dir, env.rank, env.device, settle=stops.settle)
    closing.callback(profiler.close)
    pending_save = None
    step = start_step
    while step < t.train_steps:
        profiler.begin(step + 1)
        lr = lr_at(step, cfg.optimizer, t.train_steps)
        mbs = microbatches(dataset.train_sample, step * t.global_batch_size, t.global_batch_size,
                           t.micro_batch_size, groups.dp_rank, par.dp, env.device, targets=dataset.train_loss_mask,
                           positions=dataset.train_positions)
        throughput.start()
        result = train_step(role.schedule, forward_step, mbs, role.grads, role.optimizer, groups, lr,
                            cfg.optimizer.clip_grad, cfg.model.tie_embeddings, LM_REPORT_KEYS)
        interval.add(result.sums, throughput.stop()["step_time_s"])
        step += 1
        stop_why = stop_reason(step, start_step, t, stops)
        stop_now = stop_why is not None
        profiler.end(step, stopping=stop_now)
        summary["train_loss"] = result.sums["loss_sum"] / max(result.sums["tokens"], 1.0)
        if step % cfg.logging.interval == 0 or step == t.train_steps or result.skipped or stop_now:
            # The steps since the last line: their mean loss and throughput, this step's lr and norm.
            sums, seconds, steps = interval.take()
            metrics = {"loss": sums["loss_sum"] / max(sums["tokens"], 1.0), "lr": lr, "grad_norm": result.grad_norm,
                       "skipped": int(result.skipped), "consumed_samples": step * t.global_batch_size,
                       **throughput.rates(seconds, steps)}
            logger.log(step, metrics)
        if pending_save is not None:  # the previous step's save, written while this step trained
            pending_save.finish()
            pending_save = None
        skips.update(step, result)  # before a save: the step that ends a diverged run saves nothing
        if t.eval_interval and step % t.eval_interval == 0 and step < t.train_steps:
            logger.log(step, evaluate(role, dataset, t, forward_step, env.device), kind="valid")
        if save_due(cfg.checkpoint, step, t.train_steps, stop_now):
            pending_save = save_role(cfg.checkpoint, cfg.model, role, step, run,
                                     in_background(cfg.checkpoint, step, t.train_steps, stop_now))
        if stop_now:
            logger.write(f"{stop_why}: stopping after step {step}")
            break
    stops.finish()
    assert pending_save is None  # the last save, and a stopping job's, are written in the foreground
    if step == t.train_steps:
        final = evaluate(role, dataset, t, forward_step, env.device)
        if final:
            logger.log(step, final, kind="valid")
        summary.update(final)
    summary["step"] = step
    summary["skipped_steps"] = skips.total
    if skips.total:
        logger.write(f"{skips.total} step(s) of this job skipped for a non-finite gradient norm")
    return summary


class Start(NamedTuple):
    """Where a job starts: ``step`` (0, or the resumed checkpoint's), and the settings that
    differ from what the resumed checkpoint records (``check_resume``: "field: old -> new")."""
    step: int
    changes: tuple = ()


def check_output_dirs(logging_cfg, ck: CheckpointConfig) -> None:
    """On every rank at the start of a run, so that all of them stop with the same error: the
    run's logging and checkpoint directories can be written (resume.check_output_dir)."""
    check_output_dir(logging_cfg.dir, "logging.dir")
    if ck.dir:
        check_output_dir(ck.dir, "checkpoint.dir")
        check_latest_marker(ck.dir)


def restore_role(ck: CheckpointConfig, model: ModelConfig, role: Role, rank: int, run: dict,
                 what: str = "checkpoint") -> Start:
    """Resume from ``ck.dir`` (weights, optimizer, RNG) or load ``ck.load`` weights.
    ``run`` is what this job's checkpoints record (``save_role``); a resumed checkpoint must agree.
    ``what``: the config section whose ``load`` gave ``ck.load`` (named in errors)."""
    # Everything a rank reads or checks alone comes before the role's first collective, and every
    # rank raises if any failed (one raise_together, whatever failed: an outer agreement, the
    # distillation start-up's, counts on it).
    error = path = shared = None
    loading = f"could not use checkpoint.dir {ck.dir}"  # for the other ranks' message
    try:
        if ck.dir and not ck.resume:
            refuse_other_runs(ck.dir)
        path = latest_checkpoint(ck.dir) if ck.dir and ck.resume else None
        if path is not None:
            loading = f"could not load its part of checkpoint {path}"
            reader = CheckpointReader(path, role.groups.share)
            check_checkpoint_model(reader, model)
            changes = check_resume(reader.meta, path, run)
            shared = load_training_state(reader, role.optimizer, Replicas.of(role.groups))
            saved, ours = reader.meta.get("layout") or {}, _layout_meta(role.groups)
            # Random states are per rank: in another layout (or without this rank's file) dropout
            # and on-policy sampling start over from training.seed, which the resumed job's log
            # line says.
            rng_restored = saved == ours and restore_rng(path, rank)
        elif ck.load:
            loading = f"could not load its part of {what}.load {ck.load}"
            shared = load_model_weights(ck.load, model, role.params, what, role.optimizer.separate_masters(),
                                        run.get("tokenizer_fingerprint"), role.groups.share, Replicas.of(role.groups))
    except Exception as e:  # noqa: BLE001 - any failure: the peers must not wait for this rank
        error = e
    role.groups.raise_together(error, loading)
    if shared is not None:  # each value read by one data-parallel replica, sent to the others
        shared.send(lambda e: role.groups.raise_together(e, loading))
    if path is None:
        return Start(0)
    if role.optimizer.sharded:
        role.optimizer.gather_params()
    if saved != ours:
        changes.append(f"layout: {_describe_layout(saved)} -> {_describe_layout(ours)} (random streams "
                       "restart from training.seed)")
    else:
        missing = _ranks_without(rng_restored, rank, role.groups)
        if missing:
            changes.append(f"{path.name}/rng/ has no file of rank(s) {', '.join(map(str, missing))} (their random "
                           "streams restart from training.seed)")
    return Start(int(reader.meta["step"]), tuple(changes))


def save_due(ck: CheckpointConfig, step: int, train_steps: int, stopping: bool) -> bool:
    """Whether a checkpoint is written after ``step``: every ``save_interval`` steps, at the last
    step and when the job stops early (``training.exit_*``)."""
    return bool(ck.dir) and (stopping or step == train_steps or bool(ck.save_interval and step % ck.save_interval == 0))


def describe_start(ck: CheckpointConfig, start: Start, train_steps: int) -> Optional[str]:
    """The log line of a resumed job (None for a fresh one): where it resumed, the settings that
    differ from the checkpoint's record, and that it has nothing to train when the checkpoint
    already reached ``train_steps`` (a rerun of a finished command, or another run's directory)."""
    start_step = start.step
    if start_step == 0:
        return None
    line = f"resumed from step {start_step} of {ck.dir} (checkpoint.resume)"
    if start.changes:
        line += f" with other settings than it records ({'; '.join(start.changes)}): the run goes on with the new values"
        if any(c.startswith(("optimizer.", "training.train_steps")) for c in start.changes):
            line += f"; the learning rate from step {start_step + 1} on follows the new schedule (it may jump)"
    if start_step >= train_steps:
        line += (f"; training.train_steps={train_steps} already reached: nothing to train (a new run needs a new "
                 "checkpoint.dir)")
    return line


def _ranks_without(ok: bool, rank: int, groups: RoleGroups) -> list[int]:
    """The role's ranks where ``ok`` is False, known on every rank of it (one gather over the role:
    the rank that logs learns of the others)."""
    if groups.role_group is None or dist.get_world_size(groups.role_group) == 1:
        return [] if ok else [rank]
    flags = [None] * dist.get_world_size(groups.role_group)
    dist.all_gather_object(flags, (rank, ok), group=groups.role_group)
    return [r for r, good in flags if not good]


def _describe_layout(layout: dict) -> str:
    text = " ".join(f"{k}={layout.get(k, '?')}" for k in ("tp", "pp", "dp"))
    return text + (f" from rank {layout['rank_offset']}" if layout.get("rank_offset") else "")


def _layout_meta(groups: RoleGroups) -> dict:
    lay = groups.layout
    return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "rank_offset": lay.rank_offset}


def save_role(ck: CheckpointConfig, model: ModelConfig, role: Role, step: int, run: dict,
              background: bool = False) -> Optional[PendingSave]:
    """Collective over the role's ranks. ``run``: kind, global_batch_size, data (and what else the
    loop records), checked when a later job resumes (``check_resume``). ``background``: the files
    are written while training goes on; the role's ranks publish the save (``finish`` of what
    this returns) at the same later point."""
    g = role.groups
    meta = {"model": to_dict(model), "layout": _layout_meta(g),
            "consumed_samples": step * run["global_batch_size"], **run}
    save = start_save(ck.dir, step, role.params, role.optimizer, g.dp_rank, g.role_group, g.layout.rank_offset,
                      meta, ck.keep, background)
    if background:
        return save
    save.finish()
    return None


def in_background(ck: CheckpointConfig, step: int, train_steps: int, stopping: bool) -> bool:
    """Whether the save after ``step`` is written in the background (``checkpoint.async_save``):
    not the last one, nor that of a job that stops here."""
    return ck.async_save and not stopping and step != train_steps
