"""Run configs: the sections a training job is made of, and the pretraining run config.

Each section is its own dataclass and is handed to the component that needs it (data, optimizer,
logging, ...); no component receives the whole run config.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from typing import Literal, Optional

from .loader import apply_overrides, field_error, from_dict, load_yaml, refuse_model_config, resolve_config_path
from .model import ModelConfig, load_model_config


@dataclass
class ParallelConfig:
    """One role's partitioning: tp (horizontal) x pp (vertical) x dp replicas."""

    tp: int = 1
    pp: int = 1
    dp: Optional[int] = None  # None: world_size // (tp * pp)

    def check(self, where: str = "parallel") -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise field_error(where, name, f"must be >= 1, got {getattr(self, name)}")
        if self.dp is not None and self.dp < 1:
            raise field_error(where, "dp", f"must be >= 1, got {self.dp}")

    def resolve(self, num_ranks: int, where: str = "parallel") -> "ParallelConfig":
        """Fill in dp and check tp * pp * dp == num_ranks."""
        mp = self.tp * self.pp
        # The field to blame: the one that is not 1 (both: tp, the first).
        culprit = "pp" if self.tp == 1 and self.pp > 1 else "tp"
        if self.dp is None and num_ranks % mp:
            raise field_error(where, culprit, f"tp*pp = {self.tp}*{self.pp} = {mp} does not divide the {num_ranks} "
                              "ranks")
        dp = self.dp if self.dp is not None else num_ranks // mp
        if dp < 1 or mp * dp != num_ranks:
            raise field_error(where, "dp" if self.dp is not None else culprit,
                              f"tp*pp*dp = {self.tp}*{self.pp}*{dp} = {mp * dp} != {num_ranks} ranks")
        return ParallelConfig(self.tp, self.pp, dp)

    @property
    def num_ranks(self) -> int:
        assert self.dp is not None, "resolve() first"
        return self.tp * self.pp * self.dp


@dataclass
class DataConfig:
    # megatron-core indexed dataset prefixes (``<prefix>.bin`` / ``<prefix>.idx``), concatenated.
    path: list[str] = field(default_factory=list)
    # One weight per path: train samples drawn from the corpora in these proportions, each with its
    # own split and shuffle (kdtrain/data/blend.py). None: the corpora form one concatenated stream.
    weights: Optional[list[float]] = None
    tokenizer: Optional[str] = None  # sentencepiece .model, HF tokenizer.json or its dir; checked vs the dataset
    seq_length: int = 256
    split: tuple[float, float] = (0.98, 0.02)  # train / held-out fractions of the token windows
    seed: int = 1234  # shuffling seed (independent of the init seed)
    mock: bool = False  # seeded random tokens instead of a corpus (benchmarks, smoke tests)
    # Use a corpus' loss mask (conversations: the replies are the only targets, kdtrain/data/chat.py);
    # false counts every token, prompts included, in training and evaluation.
    loss_mask: bool = True
    # How windows are cut: "stream" (the corpus as one token stream; documents cross window
    # boundaries), "documents" (whole documents per window in corpus order, padded: no reply
    # without its question) or "best_fit" (whole documents, best fit decreasing per block of
    # documents: less padding; kdtrain/data/packing.py).
    packing: Literal["stream", "documents", "best_fit"] = "stream"
    # What a token attends to: "window" (every earlier token of its window, Megatron-LM's default)
    # or "documents" (the earlier tokens of its own document, positions counted from the document's
    # start: each document as if alone; kdtrain/models/documents.py).
    attention: Literal["window", "documents"] = "window"

    def check(self, where: str = "data") -> None:
        seen = set()
        for p in self.path:
            if os.path.realpath(p) in seen:
                # The copies' held-out windows are trained on in the other copy (one stream) or
                # one copy's (blend): the held-out loss would be measured on training data.
                raise field_error(where, "path", f"{p} is listed twice; to draw a corpus more often than its "
                                  "size, give data.weights")
            seen.add(os.path.realpath(p))
        if self.weights is not None:
            if len(self.weights) != len(self.path):
                raise field_error(where, "weights", f"{len(self.weights)} weights for {len(self.path)} paths: give "
                                  "one per data.path entry")
            if not (all(w > 0 for w in self.weights) and math.isfinite(sum(self.weights))):
                raise field_error(where, "weights", f"must be > 0 with a finite sum, got {list(self.weights)}")
        check_seed(self.seed, where)
        if self.seq_length < 1:
            raise field_error(where, "seq_length", f"must be >= 1, got {self.seq_length}")
        if any(f < 0 for f in self.split) or not 0.0 < sum(self.split) <= 1.0 + 1e-9 or self.split[0] <= 0:
            raise field_error(where, "split", f"train/held-out fractions must be >= 0, sum to <= 1, "
                              f"train > 0; got {list(self.split)}")
        if self.attention == "documents" and self.mock:
            raise field_error(where, "attention", "documents: mock data has no documents (use a corpus, or "
                              "attention: window)")

    def check_precision(self, precision: "PrecisionConfig", where: str = "data") -> None:
        """Data options the precision options cannot serve."""
        if self.attention == "documents" and precision.cuda_graphs:
            raise field_error(where, "attention", "documents gives every micro-batch its own attention mask, which "
                              "precision.cuda_graphs (layers captured once, without a mask) cannot replay: set "
                              "precision.cuda_graphs=false or data.attention=window")


def check_seed(seed: int, where: str) -> None:
    """A seed torch and numpy both take, with room for the offsets derived from it."""
    if not 0 <= seed < 2**63:
        raise field_error(where, "seed", f"must be in [0, 2**63), got {seed}")


# Signals a handler cannot take, or that report a fault rather than ask for a stop.
_NOT_STOP_SIGNALS = {"SIGKILL", "SIGSTOP", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT", "SIGCHLD"}


def signal_number(name: str) -> signal.Signals:
    """The signal ``name`` (``SIGTERM``, ``SIGUSR1``, ...) a run may stop on; ValueError for others."""
    sig = getattr(signal.Signals, name, None) if isinstance(name, str) and name.startswith("SIG") else None
    if sig is None or name in _NOT_STOP_SIGNALS:
        allowed = sorted(s.name for s in signal.Signals
                         if s.name not in _NOT_STOP_SIGNALS and not s.name.startswith("SIGRT"))
        raise ValueError(f"{name!r} is not a signal a run can stop on; one of {', '.join(allowed)}")
    return sig


def check_exit(training: "TrainingConfig", checkpoint: "CheckpointConfig") -> None:
    for name in ("exit_interval", "exit_signal", "exit_duration_min"):
        if getattr(training, name) is not None and not checkpoint.dir:
            raise field_error("training", name, "stopping early needs checkpoint.dir (else the steps run so far "
                              "are lost and the same command cannot resume)")
        if getattr(training, name) is not None and not checkpoint.resume:
            raise field_error("training", name, "stopping early needs checkpoint.resume: true (else the same "
                              "command starts again from step 0 instead of going on)")


def check_profile(logging: "LoggingConfig", training: "TrainingConfig") -> None:
    if logging.profile_steps is not None and logging.profile_steps[1] > training.train_steps:
        raise field_error("logging", "profile_steps", f"{list(logging.profile_steps)} ends after the last step, "
                          f"training.train_steps={training.train_steps} (the profile would never be written)")


def check_recompute(training: "TrainingConfig", precision: "PrecisionConfig") -> None:
    if training.recompute and precision.cuda_graphs:
        raise field_error("training", "recompute", "a CUDA-graphed layer replays its captured forward and backward "
                          "and cannot run its forward again in the backward: set training.recompute=false or "
                          "precision.cuda_graphs=false")


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 32
    train_steps: int = 100
    eval_interval: int = 0  # steps between held-out evaluations; 0 = only at the end
    eval_batches: int = 4  # global batches per evaluation
    seed: int = 1234  # model init seed
    # Stop (after saving a checkpoint) once this many steps ran in this job; the same command resumes.
    exit_interval: Optional[int] = None
    # Stop the same way when this signal arrives (SIGTERM, SIGUSR1, ...: a preemption notice), or
    # once this many minutes passed since the job started (an allocation's time limit). The ranks
    # agree on the step: a step or a few after the first rank saw it (kdtrain/training/stop_requests.py).
    exit_signal: Optional[str] = None
    exit_duration_min: Optional[float] = None
    # Full activation recomputation of the trained model (kdtrain/models/layer.py): each transformer
    # layer keeps only its input for the backward and runs its forward again there. Activation
    # memory per layer drops to one [s, b, h] tensor for about a third more compute.
    recompute: bool = False
    # A step whose gradient norm is not finite is skipped (no update); this many in a row end the
    # run with an error instead of training on, logging nan, with weights that no longer change.
    # 0: never stop.
    max_skipped_steps: int = 10

    def check(self, where: str = "training") -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_steps"):
            if getattr(self, name) < 1:
                raise field_error(where, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "eval_batches", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise field_error(where, name, f"must be >= 0, got {getattr(self, name)}")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise field_error(where, "exit_interval", f"must be >= 1 (steps of this job), got {self.exit_interval}")
        if self.exit_signal is not None:
            try:
                signal_number(self.exit_signal)
            except ValueError as e:
                raise field_error(where, "exit_signal", str(e)) from None
        m = self.exit_duration_min
        if m is not None and (isinstance(m, bool) or not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0)):
            raise field_error(where, "exit_duration_min", f"must be a positive number of minutes, got {m}")
        check_seed(self.seed, where)
        if self.global_batch_size % self.micro_batch_size:
            raise field_error(where, "global_batch_size",
                              f"{self.global_batch_size} not divisible by micro_batch_size={self.micro_batch_size}")


@dataclass
class OptimizerConfig:
    # The schedule (training/optimizer.py lr_at): linear warm-up to `lr` over `warmup_steps`, then
    # `decay_style` from `lr` down to `min_lr` at step `decay_steps`, held there after; `constant`
    # stays at `lr` (min_lr and decay_steps unused).
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: Optional[int] = None  # counted from step 0, warm-up included; None = training.train_steps
    weight_decay: float = 0.1  # decoupled (AdamW); not on 1-D parameters (biases, norm weights), as in megatron-core
    beta1: float = 0.9  # AdamW's moment decay rates and denominator epsilon
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    distributed: bool = False  # ZeRO-1: shard master weights and Adam state across data-parallel ranks

    def check(self, where: str = "optimizer") -> None:
        if self.lr <= 0:
            raise field_error(where, "lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise field_error(where, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise field_error(where, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise field_error(where, name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "clip_grad"):
            if getattr(self, name) < 0:
                raise field_error(where, name, f"must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise field_error(where, "eps", f"must be > 0, got {self.eps}")
        # decay_steps counts from step 0, warm-up included: the decay runs over the steps after it.
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            raise field_error(where, "decay_steps", f"{self.decay_steps} leaves no steps to decay over after "
                              f"warmup_steps={self.warmup_steps} (it counts from step 0; leave it unset to decay "
                              "until training.train_steps)")


@dataclass
class PrecisionConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on cuda, fp32 on cpu
    # torch.compile each transformer layer (kdtrain/models/compile.py): fused elementwise kernels
    # and less host time per layer on GPU; same math. The first steps include the compilation.
    compile: bool = False
    # Replay each transformer layer's forward and backward as CUDA graphs (kdtrain/models/
    # cuda_graphs.py): removes the host time per layer that bounds small models; same math.
    # CUDA only, tp = pp = 1 for the trained model. A model's layers are compiled or graphed: with
    # both options, distillation graphs the student and compiles the teacher; pretraining refuses.
    cuda_graphs: bool = False


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # metrics.jsonl, TensorBoard events, wandb files
    # Steps per log line (also the last step, a job's last step and a skipped step). A line reports
    # the mean loss and throughput of the steps since the last one, and its own step's lr and norm.
    interval: int = 1
    progress_bar: bool = True  # a tqdm bar on the logging rank (else a line per log step)
    tensorboard: bool = True  # event files under <dir>/tensorboard
    wandb: bool = False  # a wandb run, offline under <dir>/wandb unless online (below)
    wandb_project: Optional[str] = None  # online when a project is given and a key is available
    wandb_entity: Optional[str] = None  # the wandb team or user the run goes to (wandb's default: yours)
    peak_tflops: Optional[float] = None  # per-device dense peak for MFU; None = look up the device
    # [first, last] steps (1-based, as logged) to record with torch.profiler: summary, operator
    # table and trace per rank under <dir>/profile/ (kdtrain/training/profiling.py); a job that
    # resumes or stops (training.exit_*) inside the window records the window's steps it runs.
    profile_steps: Optional[tuple[int, int]] = None

    def check(self, where: str = "logging") -> None:
        if self.interval < 1:
            raise field_error(where, "interval", f"must be >= 1, got {self.interval}")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise field_error(where, "peak_tflops", f"must be a positive number of TFLOP/s per device (unset: look "
                              f"up the device), got {self.peak_tflops}")
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise field_error(where, "profile_steps", f"[first, last] with 1 <= first <= last, "
                              f"got {list(self.profile_steps)}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: no checkpoints
    save_interval: int = 0  # steps; 0 = only at the end
    keep: int = 2  # most recent checkpoints kept on disk
    resume: bool = True  # continue from dir's latest checkpoint when there is one
    load: Optional[str] = None  # initial weights (model only): a kdtrain checkpoint or a HF model dir
    # Write the interval saves' files in a background thread while the next step trains (a host
    # copy of each rank's part is taken at the save, published after that next step: a job that
    # fails in that step loses the save and resumes from the one before); the last save and the
    # one of a job that stops early are written before the job ends (after the pending one).
    async_save: bool = False

    def check(self, where: str = "checkpoint") -> None:
        if self.save_interval < 0:
            raise field_error(where, "save_interval", f"must be >= 0, got {self.save_interval}")
        if self.keep < 1:
            raise field_error(where, "keep", f"must be >= 1, got {self.keep}")


@dataclass
class DistributedConfig:
    """How the ranks talk, and how long a rank waits for the others.

    ``timeout_s`` bounds every collective and point-to-point wait among ranks that work together
    (a hung collective or a dead peer ends the job after it, so keep it short).

    ``idle_timeout_s`` (distillation, teacher caching) bounds the waits of ranks that idle while
    others work alone, which last as long as that work: rank 0 hashing the teacher's weight files (a
    cache job, a mixed run), a cache job's replicas writing their last shards; on an on-policy step
    every rank waits in one hand-off for the students' samples (a disaggregated teacher for all of
    the sampling, colocated replicas that finish first for the slowest), and disaggregated teacher
    ranks wait while the students save a checkpoint, run the held-out pass or train on cached steps
    (a mixed teacher source); the students wait for a disaggregated teacher's start (its load from
    slow storage, say) in the start-up agreement. Those waits go through a world group of their own
    with this bound; a run whose on-policy sampling the planner estimates longer than it is refused
    at start (``split.profile``, else this device's profile), and a wait that still runs out names
    itself and this key."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on cuda, gloo on cpu
    timeout_s: float = 600.0  # a collective or peer stalled this long ends the job
    idle_timeout_s: float = 10800.0  # 3 h: the idle waits of a distillation run (see above)

    def check(self, where: str = "distributed") -> None:
        for name in ("timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise field_error(where, name, f"must be a positive number of seconds, got {value}")


@dataclass
class PretrainConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, world_size: int) -> "PretrainConfig":
        """Cross-section checks that need the world size; fills in derived values."""
        self.parallel = self.parallel.resolve(world_size, "parallel")
        self.model.check_layout(self.parallel.tp, self.parallel.pp, "parallel")
        if self.data.seq_length > self.model.max_seq_length:
            raise field_error("data", "seq_length", f"{self.data.seq_length} exceeds model.max_seq_length="
                              f"{self.model.max_seq_length} of model {self.model.name!r}")
        t, dp = self.training, self.parallel.dp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise field_error("training", "global_batch_size",
                              f"{t.global_batch_size} not divisible by micro_batch_size*dp = "
                              f"{t.micro_batch_size}*{dp}")
        if not self.data.path and not self.data.mock:
            raise field_error("data", "path", "no dataset given (list of indexed-dataset prefixes, or mock: true)")
        self.data.check_precision(self.precision)
        check_recompute(self.training, self.precision)
        check_exit(self.training, self.checkpoint)
        check_profile(self.logging, self.training)
        return self


def load_run_dict(path: str | None, overrides=(), kind: str = "pretrain", model_keys=("model",)) -> dict:
    """Load a run YAML (path or name under configs/<kind>/), apply overrides, expand model refs."""
    raw = load_yaml(resolve_config_path(path, kind)) if path else {}
    apply_overrides(raw, overrides, expand={k: "models" for k in model_keys})
    return raw


def load_pretrain_config(path: str | None, overrides=()) -> PretrainConfig:
    raw = load_run_dict(path, overrides)
    if "model" not in raw and ("teacher" in raw or "student" in raw):
        raise ValueError(f"{path}: a distillation config (teacher:, student:), not a pretraining one: run it with "
                         "scripts/distill_gpt.py")
    refuse_model_config(raw, path, "model")
    if "model" not in raw:
        raise ValueError("model: required key is missing (a name under configs/models/ or a YAML path)")
    raw["model"] = load_model_config(raw["model"], "model")
    if "data" not in raw:
        raise ValueError("data: required section is missing")
    return from_dict(PretrainConfig, raw)
