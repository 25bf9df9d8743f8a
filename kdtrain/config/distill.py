"""Distillation run config: two roles (teacher, student), how they share the ranks, the KD loss.

    teacher: {model: llama-3.1-8b, load: checkpoints/teacher, tp: 4, pp: 1, topk: 64}
    student: {model: llama-3.2-1b, tp: 1, pp: 1}

(``model`` and ``load`` may both name a Hugging Face directory: ``model: /models/Llama-3.1-8B``.)
``onpolicy: {fraction: 0.5, prompt_length: 256, temperature: 1.0}`` trains that share of the steps
on the student's own samples (see ``OnPolicyConfig``).
    split:   {mode: disaggregated, teacher_ranks: 4, depth: 2}
    loss:    {divergence: forward_kl, tau: 1.0, alpha: 0.0}

``split.mode``:
* ``colocated``: both roles span all ranks; each rank runs its teacher micro-batches of a step,
  then the student's step. ``tp*pp*dp`` of each role equals the world size.
* ``disaggregated``: the teacher owns ranks ``[0, Wt)`` and the student ``[Wt, W)`` (or the other
  way round with ``teacher_first: false``); they run concurrently, the teacher up to
  ``split.depth`` micro-batches ahead. ``Wt`` is ``split.teacher_ranks`` or derived from the
  teacher's ``tp*pp*dp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..loss import KDLossConfig
from .loader import field_error, from_dict, refuse_model_config
from .model import ModelConfig, load_model_config
from .run import (CheckpointConfig, DataConfig, DistributedConfig, LoggingConfig, OptimizerConfig, ParallelConfig,
                  PrecisionConfig, TrainingConfig, check_exit, check_profile, check_recompute, load_run_dict)

MAX_TOPK = 1024  # the fused loss kernel's limit


@dataclass
class TeacherConfig:
    model: ModelConfig
    load: Optional[str] = None  # kdtrain checkpoint (a run's checkpoint dir or one step_N dir) or HF model dir
    random_init: bool = False  # no checkpoint: seeded random weights (benchmarks and tests only)
    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # None: span // (tp * pp)
    topk: int = 64  # ids and logits per token sent to the student
    values_dtype: Literal["fp32", "bf16"] = "fp32"  # precision of the streamed top-k logits
    # Where payloads come from: the live teacher every step (online), a cache written by
    # scripts/cache_teacher.py (cache: no teacher is built), or the cache with the live teacher
    # on a `live_fraction` of the steps and on every step the cache does not cover (mixed).
    source: Literal["online", "cache", "mixed"] = "online"
    cache: Optional[str] = None  # cache directory (source: cache | mixed)
    live_fraction: float = 0.0  # mixed: share of steps served by the live teacher, spread evenly

    def check(self, where: str = "teacher") -> None:
        ParallelConfig(self.tp, self.pp, self.dp).check(where)
        if not 1 <= self.topk <= MAX_TOPK:
            raise field_error(where, "topk", f"must be in [1, {MAX_TOPK}], got {self.topk}")
        if self.topk > self.model.vocab_size:
            raise field_error(where, "topk", f"{self.topk} exceeds the vocabulary ({self.model.vocab_size})")
        if self.source != "online" and self.cache is None:
            raise field_error(where, "cache", f"source: {self.source} reads a teacher cache: give its directory "
                              f"({where}.cache=DIR, written by scripts/cache_teacher.py)")
        if self.source == "online" and self.cache is not None:
            raise field_error(where, "cache", f"{self.cache} is read with source: cache or mixed; source is "
                              "'online' (the live teacher every step)")
        if not 0.0 <= self.live_fraction <= 1.0:
            raise field_error(where, "live_fraction", f"must be in [0, 1], got {self.live_fraction}")
        if self.live_fraction and self.source != "mixed":
            raise field_error(where, "live_fraction", "only for source: mixed")
        if self.source != "cache":  # with source: cache no teacher is built: its payloads are in the cache
            self.check_weights(where)

    def check_weights(self, where: str = "teacher") -> None:
        """For every job that builds the teacher (training with a live teacher, writing a cache)."""
        if self.load is None and not self.random_init:
            raise field_error(where, "load", "a teacher needs weights: a kdtrain checkpoint or a Hugging Face "
                              "model directory (or random_init: true for benchmarks)")
        if self.load is not None and self.random_init:
            raise field_error(where, "random_init", "set either load or random_init, not both")

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tp, self.pp, self.dp)


@dataclass
class StudentConfig:
    model: ModelConfig
    load: Optional[str] = None  # initial weights (kdtrain checkpoint or HF model dir); None: seeded random init
    tp: int = 1  # the student's own layout: tensor and pipeline parallel sizes,
    pp: int = 1
    dp: Optional[int] = None  # and replicas (None: the ranks its split leaves it / (tp * pp))

    def check(self, where: str = "student") -> None:
        ParallelConfig(self.tp, self.pp, self.dp).check(where)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tp, self.pp, self.dp)


@dataclass
class SplitConfig:
    # auto: the planner picks colocated or disaggregated and both roles' tp/pp/dp for the world
    # size (kdtrain/training/auto_split.py; `kdtrain plan` shows the ranking).
    mode: Literal["colocated", "disaggregated", "auto"] = "colocated"
    teacher_ranks: Optional[int] = None  # disaggregated: ranks given to the teacher
    teacher_first: bool = True  # disaggregated: teacher on the low ranks (auto: always, as the planner prices it)
    depth: int = 2  # disaggregated: micro-batches the teacher may run ahead of the student
    timeout_s: float = 300.0  # a peer silent this long ends the job with an error
    # Planner profile name or `kdtrain calibrate` JSON (None: this device's) that auto plans with and
    # that estimates on-policy sampling against distributed.idle_timeout_s at start.
    profile: Optional[str] = None
    gpus_per_node: Optional[int] = None  # auto: None = torchrun's LOCAL_WORLD_SIZE

    def check(self, where: str = "split") -> None:
        if self.depth < 1:
            raise field_error(where, "depth", f"must be >= 1, got {self.depth}")
        if self.timeout_s <= 0:
            raise field_error(where, "timeout_s", f"must be positive, got {self.timeout_s}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise field_error(where, "gpus_per_node", f"must be >= 1 (or unset: torchrun's LOCAL_WORLD_SIZE), "
                              f"got {self.gpus_per_node}")


@dataclass
class OnPolicyConfig:
    """Student-generated sequences (on-policy distillation; GKD's lambda). On a ``fraction`` of the
    steps, spread evenly, the student writes part of each training window by sampling at
    ``temperature`` (models/generate.py); the teacher scores those sequences and the loss covers
    the sampled tokens only, with no hard-label term (the labels would be the student's own
    samples). 0 = off: every step distils on the data. Either split works; on a sampled step a
    disaggregated teacher waits for the samples instead of running ahead, a wait bounded by
    ``distributed.idle_timeout_s`` (a run whose sampling the planner estimates longer is refused
    at start). With
    ``teacher.source: mixed`` the sampled steps are live and the others may come from the cache.

    What the student writes: on documents, everything after each window's first
    ``prompt_length`` tokens. On conversations (a corpus with a loss mask, ``data.loss_mask``
    true), the replies that start inside the window (``replies: first``, the default: the first
    one; ``all``: each of them): the prompt is the window up to the reply (the conversation so
    far), the student writes until it samples ``stop_token`` (default: the corpus' EOS id, which
    ends each reply in the plain template and is the end-of-turn token of Hugging Face chat
    tokenizers; a run whose stop token ends none of the replies of its first windows is refused
    at start; -1: never stop) or the window ends, and the data's next turn follows its reply.
    Only what the student wrote is trained; a window in which no reply starts trains nothing on
    that step. A blend of both kinds (``data.weights``) treats each window as its corpus is; the
    stop token then ends document samples too. ``all`` decodes through the whole window (one
    forward per token) where ``first`` stops after the first reply, so it costs more sampling
    time for more trained tokens."""

    fraction: float = 0.0
    prompt_length: int = 128
    temperature: float = 1.0
    stop_token: Optional[int] = None
    replies: Literal["first", "all"] = "first"
    # Draw only among the top_k most likely tokens (0: all), then the smallest of those holding
    # top_p of their probability (1: all); transformers' order (models/generate.py).
    top_k: int = 0
    top_p: float = 1.0
    # Rows per sampling call (0: all of a replica's samples of the step at once). Decoding is one
    # forward per token, bound by launch overhead at small batches: larger calls amortise it, at
    # the memory of their key/value cache; with precision.cuda_graphs each token's forward replays
    # as one CUDA graph (models/decode_graph.py).
    sample_batch: int = 0

    def check(self, where: str = "onpolicy") -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise field_error(where, "fraction", f"must be in [0, 1], got {self.fraction}")
        if self.prompt_length < 1:
            raise field_error(where, "prompt_length", f"must be >= 1, got {self.prompt_length}")
        if self.temperature < 0:
            raise field_error(where, "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise field_error(where, "top_k", f"must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise field_error(where, "top_p", f"must be in (0, 1], got {self.top_p}")
        if self.stop_token is not None and self.stop_token < -1:
            raise field_error(where, "stop_token", f"must be a token id, or -1 for none, got {self.stop_token}")
        if self.sample_batch < 0:
            raise field_error(where, "sample_batch", f"must be >= 0 (0 = a replica's whole share), got {self.sample_batch}")


@dataclass(frozen=True)
class Spans:
    """Resolved rank spans and layouts of both roles."""

    teacher_offset: int
    teacher: ParallelConfig
    student_offset: int
    student: ParallelConfig


@dataclass
class DistillConfig:
    teacher: TeacherConfig
    student: StudentConfig
    data: DataConfig
    split: SplitConfig = field(default_factory=SplitConfig)
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

    def resolve_spans(self, world_size: int) -> Spans:
        t, s, sp = self.teacher, self.student, self.split
        assert sp.mode != "auto", "split.mode: auto is resolved by the planner before the spans"
        if sp.mode == "colocated":
            if sp.teacher_ranks is not None:
                raise field_error("split", "teacher_ranks", "only for mode: disaggregated (colocated roles share all ranks)")
            if t.source == "cache":
                # No teacher is built: its (unused) groups mirror the student's, so the teacher's
                # tp/pp/dp (those of the job that wrote the cache) constrain nothing here.
                spar = s.parallel.resolve(world_size, "student")
                return Spans(0, spar, 0, spar)
            return Spans(0, t.parallel.resolve(world_size, "teacher"), 0, s.parallel.resolve(world_size, "student"))
        wt = sp.teacher_ranks
        if wt is None:
            if t.dp is None:
                raise field_error("split", "teacher_ranks", "disaggregated: give split.teacher_ranks or teacher.dp")
            wt = t.tp * t.pp * t.dp
        if not 0 < wt < world_size:
            raise field_error("split", "teacher_ranks", f"{wt} leaves no ranks for one of the roles "
                              f"(world size {world_size})")
        tpar = t.parallel.resolve(wt, "teacher")
        spar = s.parallel.resolve(world_size - wt, "student")
        if sp.teacher_first:
            return Spans(0, tpar, wt, spar)
        return Spans(world_size - wt, tpar, 0, spar)

    def validate(self, world_size: int) -> Spans:
        """Cross-section checks that need the world size; returns the resolved rank spans."""
        if self.teacher.source == "cache" and self.split.mode == "auto":
            raise field_error("split", "mode", "teacher.source: cache trains the student on every rank: "
                              "use split.mode: colocated (nothing to plan)")
        if self.teacher.source == "cache" and self.split.mode != "colocated":
            raise field_error("split", "mode", "teacher.source: cache builds no teacher, so every rank trains the "
                              "student: use split.mode: colocated")
        spans = self.resolve_spans(world_size)
        tm, sm = self.teacher.model, self.student.model
        if self.teacher.source != "cache":
            tm.check_layout(spans.teacher.tp, spans.teacher.pp, "teacher")
        sm.check_layout(spans.student.tp, spans.student.pp, "student")
        if tm.vocab_size != sm.vocab_size:
            raise field_error("student", "model", f"vocab_size {sm.vocab_size} of student {sm.name!r} differs from "
                              f"vocab_size {tm.vocab_size} of teacher {tm.name!r}: distillation needs one tokenizer "
                              f"(Hugging Face tables are often padded to different sizes for the same tokenizer: "
                              f"set both to its number of ids, teacher.model.vocab_size=N student.model.vocab_size=N)")
        seq = self.data.seq_length
        for role, m in (("teacher", tm), ("student", sm)):
            if seq > m.max_seq_length:
                raise field_error("data", "seq_length", f"{seq} exceeds max_seq_length={m.max_seq_length} "
                                  f"of the {role} model {m.name!r}")
        tr = self.training
        n_mb = tr.global_batch_size // tr.micro_batch_size
        for role, dp in (("student", spans.student.dp), ("teacher", spans.teacher.dp)):
            if n_mb % dp:
                raise field_error("training", "global_batch_size",
                                  f"{tr.global_batch_size} / micro_batch_size {tr.micro_batch_size} = {n_mb} "
                                  f"micro-batches per step do not split evenly over the {role}'s dp={dp} replicas")
        if not self.data.path and not self.data.mock:
            raise field_error("data", "path", "no dataset given (list of indexed-dataset prefixes, or mock: true)")
        self.data.check_precision(self.precision)
        check_recompute(self.training, self.precision)
        check_exit(self.training, self.checkpoint)
        check_profile(self.logging, self.training)
        if self.loss.values_are_logprobs:
            raise field_error("loss", "values_are_logprobs", "a run's teacher (live or cached) sends its top-k logits "
                              "and the log-mass of the rest, never log-probs: leave it false (it is for calling the "
                              "loss directly on log-probs)")
        if self.loss.ignore_index != KDLossConfig.ignore_index:
            raise field_error("loss", "ignore_index", f"{self.loss.ignore_index}: a run's labels are token ids and its "
                              "targets come from the data's masks (data.loss_mask, data.packing), which the held-out "
                              "losses use too; ignore_index is for calling the loss directly")
        if self.split.timeout_s > self.distributed.timeout_s:
            raise field_error("split", "timeout_s", f"{self.split.timeout_s} exceeds distributed.timeout_s="
                              f"{self.distributed.timeout_s}, the world group's timeout, which ends a stalled "
                              "transfer first: raise distributed.timeout_s too")
        if self.student.load and self.checkpoint.load and self.student.load != self.checkpoint.load:
            raise field_error("student", "load", f"{self.student.load!r} and checkpoint.load {self.checkpoint.load!r} "
                              "both give the student's initial weights: set one")
        if self.onpolicy.fraction > 0:
            self._check_onpolicy()
        return spans

    def _check_onpolicy(self) -> None:
        op = self.onpolicy
        if op.stop_token is not None and op.stop_token >= self.student.model.vocab_size:
            raise field_error("onpolicy", "stop_token", f"{op.stop_token} is not an id of the student's vocabulary "
                              f"(vocab_size {self.student.model.vocab_size})")
        if op.prompt_length > self.data.seq_length:
            raise field_error("onpolicy", "prompt_length", f"{op.prompt_length} leaves no token to sample in windows "
                              f"of data.seq_length + 1 = {self.data.seq_length + 1} (it applies to document "
                              "windows; conversation windows sample their replies whatever it is, but it must still "
                              "fit: lower it)")
        if self.teacher.source == "cache":
            raise field_error("teacher", "source", "onpolicy needs the live teacher (a cache holds the data's "
                              "payloads, not those of the student's samples): use online, or mixed (sampled "
                              "steps live, the others from the cache)")


def load_distill_config(path: Optional[str], overrides=()) -> DistillConfig:
    raw = load_run_dict(path, overrides, kind="distill", model_keys=("teacher.model", "student.model"))
    if "model" in raw and "teacher" not in raw and "student" not in raw:
        raise ValueError(f"{path}: a pretraining config (model:), not a distillation one (teacher:, student:): run "
                         "it with scripts/pretrain_gpt.py")
    refuse_model_config(raw, path, "teacher.model or student.model")
    for role in ("teacher", "student"):
        section = raw.get(role)
        if section is None:
            raise ValueError(f"{role}: required section is missing (needs at least model: <name>)")
        if not isinstance(section, dict):
            hint = (f" (for a model name write {role}: {{model: {section}}}, or the override {role}.model={section})"
                    if isinstance(section, str) else "")
            raise ValueError(f"{role}: expected a section with at least model: <name>, got {section!r}{hint}")
        if "model" not in section:
            raise ValueError(f"{role}.model: required key is missing (a name under configs/models/ or a YAML path)")
        section["model"] = load_model_config(section["model"], f"{role}.model")
    if "data" not in raw:
        raise ValueError("data: required section is missing")
    return from_dict(DistillConfig, raw)
