"""What a resumed job must agree with: the run record its checkpoints keep (``run_record``), the
checks that a job resuming from them continues that run (``check_resume``: same kind, batch,
sample stream, teacher, objective and precision) and the changes it may make (reported in its
log line), and the output directories a run checks before training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..cli import check_out_dir
from ..config import DataConfig, to_dict
from ..config.inert import inactive_loss_fields, inactive_optimizer_fields
from ..config.model import load_model_config, weight_differences
from ..data import Tokenizer
from ..data.indexed import corpus_tokenizer
from .step_dirs import complete_steps


# What fixes the order of the samples a run draws: a resumed job that changed one of these would
# continue a different sample stream from the recorded step (skipping or repeating data) silently.
RESUME_DATA_FIELDS = ("seq_length", "seed", "split", "weights", "packing", "attention", "loss_mask", "mock")


def data_tokenizer(data: DataConfig) -> Optional[str]:
    """The fingerprint of the tokenizer the run's ids come from: its corpora's (their metadata),
    else ``data.tokenizer``'s; None for mock data or corpora that record none."""
    if data.mock:
        return None
    for prefix in data.path:
        if (fp := corpus_tokenizer(prefix)) is not None:
            return fp
    return Tokenizer(data.tokenizer).fingerprint if data.tokenizer else None


def run_record(kind: str, global_batch_size: int, data: DataConfig, **extra) -> dict:
    """What a run's checkpoints record about it (``save_role``), checked when a job resumes
    (``check_resume``): the kind of run, the global batch, the data section and the size of
    each corpus' token file (a corpus tokenized again in place keeps its name, not its size);
    and the tokenizer of its ids (checked when another run loads the weights). ``extra``: what
    the loops add, also checked: ``dtype``; for distillation ``teacher`` (its model config),
    ``teacher_load``, ``teacher_weights_sha256`` (known when a cache serves the payloads),
    ``topk`` and ``loss``; ``optimizer``, ``train_steps``, ``teacher_source`` and
    ``teacher_values_dtype``, reported when they change."""
    sizes = None if data.mock else [os.path.getsize(f"{p}.bin") if os.path.isfile(f"{p}.bin") else None
                                    for p in data.path]
    return {"kind": kind, "global_batch_size": global_batch_size, "data": to_dict(data), "corpus_bytes": sizes,
            "tokenizer_fingerprint": data_tokenizer(data), **extra}


def check_resume(meta: dict, path: Path, run: dict) -> list[str]:
    """A job that resumes from ``path`` continues the run recorded there: same kind of run, same
    global batch (the data position is ``step * global_batch_size``), the same sample stream, and
    the same teacher, top-k, KD loss and dtype. ``run`` is what ``save_role`` records for this job
    (kind, global_batch_size, data, ...). Other optimizer settings or ``train_steps`` (extending a
    run, payloads from a cache) are allowed: returns them as "field: old -> new" for the run's log.
    Fields a checkpoint of an earlier version does not record are not checked."""
    fresh = "start a new run from its weights with checkpoint.load in another checkpoint.dir"
    kind = meta.get("kind")
    if kind != run["kind"]:
        raise ValueError(f"checkpoint.dir: {path} holds a {kind} checkpoint and this is a {run['kind']} run; "
                         f"{fresh}")
    step, consumed = int(meta.get("step", 0)), meta.get("consumed_samples")
    batch = run["global_batch_size"]
    if step and consumed is not None and consumed != step * batch:
        raise ValueError(f"training.global_batch_size: {batch} here, {consumed // step} in {path} (its step {step} "
                         f"consumed {consumed} samples): resuming would skip or repeat data; resume with "
                         f"global_batch_size={consumed // step} or {fresh}")
    # Compare the JSON forms (tuples are lists there).
    saved, ours = meta.get("data", {}), json.loads(json.dumps(run["data"], default=str))
    for k in RESUME_DATA_FIELDS:
        if k in saved and saved[k] != ours.get(k):
            raise ValueError(f"data.{k}: {ours.get(k)!r} here, {saved[k]!r} in {path}: resuming would continue "
                             f"another sample stream from step {step}; resume with the recorded value or {fresh}")
    if "path" in saved:
        # A corpus may move between jobs; its files keep their names.
        if [Path(p).name for p in saved["path"]] != [Path(p).name for p in ours.get("path", [])]:
            raise ValueError(f"data.path: {ours.get('path')} here, {saved['path']} in {path}: resuming would "
                             f"continue on another corpus; {fresh}")
    for prefix, was, now in zip(ours.get("path", []), meta.get("corpus_bytes") or [], run.get("corpus_bytes") or []):
        if was is not None and now is not None and was != now:
            raise ValueError(f"data.path: {prefix}.bin has {now} bytes here, {was} when {path} was saved (tokenized "
                             f"again or changed since): resuming would continue another sample stream; {fresh}")
    _check_same_target(meta, path, run, step, fresh)
    return _report_changes(meta, run)


def _check_same_target(meta: dict, path: Path, run: dict, step: int, fresh: str) -> None:
    """The teacher, top-k, KD loss and dtype a resumed job trains with are the recorded ones."""
    def refuse(field: str, here, there, why: str):
        raise ValueError(f"{field}: {here} here, {there} in {path}: resuming at step {step} would {why}; resume "
                         f"with the recorded value or {fresh}")

    ours = json.loads(json.dumps({k: run.get(k) for k in ("teacher", "loss")}, default=str))
    if meta.get("teacher") is not None and ours["teacher"] is not None:
        saved = meta["teacher"]
        # Fields that change the teacher's weights or outputs; training-only ones (dropout) may differ.
        diff = weight_differences(saved, load_model_config(ours["teacher"], "teacher.model"))
        if diff:
            k = diff[0]
            refuse(f"teacher.model.{k}", repr(ours["teacher"].get(k)), repr(saved.get(k)),
                   f"distil the rest of the run from another teacher (differing fields: {diff})")
    was, now = meta.get("teacher_load"), run.get("teacher_load")
    # A teacher checkpoint may move between jobs; it keeps its name.
    if was is not None and now is not None and Path(was).name != Path(now).name:
        refuse("teacher.load", now, was, "distil the rest of the run from another teacher")
    # Known when a cache served the payloads (its manifest hashes the teacher's weights): a cache
    # of another checkpoint of the same name and shape is another teacher too.
    # Digests made by different rules (a cache of an earlier release, one written since) say
    # nothing of each other: the teacher's model and checkpoint name above still must match.
    was, now = meta.get("teacher_weights_sha256"), run.get("teacher_weights_sha256")
    same_rule = meta.get("teacher_weights_hash", "stream") == run.get("teacher_weights_hash", "stream")
    if was is not None and now is not None and same_rule and was != now:
        refuse("teacher.cache", f"teacher weights {now[:16]}", f"teacher weights {was[:16]}",
               "distil the rest of the run from another teacher")
    if meta.get("topk") is not None and run.get("topk") is not None and meta["topk"] != run["topk"]:
        refuse("teacher.topk", run["topk"], meta["topk"], "train the rest of the run on another objective")
    saved_loss = meta.get("loss") or {}
    inactive = inactive_loss_fields(saved_loss) & inactive_loss_fields(ours["loss"] or {})
    for k, was in saved_loss.items():
        if ours["loss"] is not None and k not in inactive and was != ours["loss"].get(k):
            refuse(f"loss.{k}", repr(ours["loss"].get(k)), repr(was), "train the rest of the run on another objective")
    if meta.get("dtype") is not None and run.get("dtype") is not None and meta["dtype"] != run["dtype"]:
        refuse("precision.dtype", repr(run["dtype"]), repr(meta["dtype"]),
               "continue the run in another precision (its loss curve and updates change)")


# Not a setting of the updates: ZeRO-1 or not is a layout, which a checkpoint does not fix.
_UNREPORTED_OPTIMIZER_FIELDS = ("distributed",)


def _report_changes(meta: dict, run: dict) -> list[str]:
    """Settings that may change when a run resumes, as "field: old -> new": the optimizer's and
    ``train_steps`` (the learning rate follows the new schedule, it may jump), and where the
    teacher's payloads come from and in which precision (their rounding changes)."""
    changes = []
    saved, ours = meta.get("optimizer"), json.loads(json.dumps(run.get("optimizer"), default=str))
    if saved is not None and ours is not None:
        quiet = set(_UNREPORTED_OPTIMIZER_FIELDS) | (inactive_optimizer_fields(saved)
                                                     & inactive_optimizer_fields(ours))
        changes += [f"optimizer.{k}: {was!r} -> {ours.get(k)!r}" for k, was in saved.items()
                    if k not in quiet and was != ours.get(k)]
    for key, field in (("train_steps", "training.train_steps"), ("teacher_source", "teacher.source"),
                       ("teacher_values_dtype", "teacher.values_dtype")):
        was, now = meta.get(key), run.get(key)
        if was is not None and now is not None and was != now:
            changes.append(f"{field}: {was} -> {now}")
    return changes


def check_output_dir(path: str | os.PathLike, field: str) -> None:
    """At the start, that ``path`` (a run's logging or checkpoint directory) is one or can be
    created, so that a path below a file or without permission is an error naming ``field`` before
    any training, not a traceback at the first save; nothing is created (a run that fails to start
    leaves no empty directories). A checkpoint's step directory given as ``checkpoint.dir`` is
    refused (the run would start afresh inside it)."""
    path = Path(path)
    check_out_dir(path, field)
    if field == "checkpoint.dir" and path.name.removeprefix("step_").isdigit() and (path / "meta.json").is_file():
        raise ValueError(f"checkpoint.dir: {path} is one checkpoint (a step directory): give its parent "
                         f"{path.parent} to resume that run, or checkpoint.load={path} with a new checkpoint.dir "
                         "to start a new run from its weights")


def refuse_other_runs(ck_dir: str | os.PathLike) -> None:
    """``checkpoint.resume: false`` into a directory that holds checkpoints would mix two runs there,
    and pruning (by step number) would delete the new run's checkpoints before the old ones."""
    done = complete_steps(Path(ck_dir))
    if done:
        raise ValueError(f"checkpoint.resume: false, but checkpoint.dir {ck_dir} holds checkpoints of a run "
                         f"({done[-1].name}, ...): saving there would mix the two runs and prune the new one's "
                         "checkpoints first; use a new checkpoint.dir, remove the old checkpoints, or resume")
