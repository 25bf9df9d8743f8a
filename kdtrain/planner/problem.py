"""What a plan search is asked and what it answers: the inputs (``Problem``, with on-policy
``Sampling``), one role's ``Layout`` and a priced ``Plan`` (the interface ``split: auto`` reads).
The search itself is search.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional

from .memory import GiB, ModelShape
from .profiles import HardwareProfile

MAX_TOPK = 1024  # the fused loss kernel's limit (kdtrain/config/distill.py)


@dataclass(frozen=True)
class Sampling:
    """On-policy steps (the distill config's ``onpolicy``): the share of steps on the student's
    own samples, the positions of each window before the first sampled one (``prompt_length``;
    on conversations, where a window's first reply starts, which the planner takes to be there
    too) and the rows per sampling call (``sample_batch``; 0: all of a replica's rows at once)."""

    fraction: float
    prompt: int
    sample_batch: int = 0

    def calls(self, rows: int) -> tuple[int, int]:
        """(rows per call, calls) for a replica with ``rows`` rows per step."""
        per_call = min(self.sample_batch or rows, rows)
        return per_call, -(-rows // per_call)


# What Problem.check's errors call each input: `kdtrain plan`'s flags, or the distill config's
# fields where the inputs come from a run config (`split.mode: auto`, `kdtrain plan --config`).
CLI_NAMES = MappingProxyType({
    "world_size": "--world-size", "gpus_per_node": "--gpus-per-node", "profile": "--profile",
    "student": "--student", "seq_len": "--seq-len", "global_batch": "--global-batch", "topk": "--topk",
    "micro_batch": "--micro-batch", "depth": "split.depth", "no_recompute": "--recompute never",
    "onpolicy_fraction": "--onpolicy-fraction", "prompt_len": "--prompt-len", "sample_batch": "--sample-batch"})
CONFIG_NAMES = MappingProxyType({
    "world_size": "the world size", "gpus_per_node": "split.gpus_per_node", "profile": "split.profile",
    "student": "student.model", "seq_len": "data.seq_length", "global_batch": "training.global_batch_size",
    "topk": "teacher.topk", "micro_batch": "training.micro_batch_size", "depth": "split.depth",
    "no_recompute": "training.recompute=false", "onpolicy_fraction": "onpolicy.fraction",
    "prompt_len": "onpolicy.prompt_length", "sample_batch": "onpolicy.sample_batch"})


@dataclass(frozen=True)
class Problem:
    """Everything a search needs; ``check()`` raises ValueError naming the input as ``names`` calls
    it (``CLI_NAMES`` or ``CONFIG_NAMES``)."""

    teacher: ModelShape
    student: ModelShape
    world_size: int
    gpus_per_node: int
    seq_len: int
    global_batch: int
    topk: int
    profile: HardwareProfile
    dtype_bytes: int = 2  # bf16 weights and activations
    values_bytes: int = 4  # teacher.values_dtype fp32
    depth: int = 2  # split.depth
    max_micro_batch: int = 16
    micro_batches: Optional[tuple[int, ...]] = None  # None: divisors of the global batch <= max
    distributed_optimizer: Optional[bool] = None  # None: try both
    recompute: Optional[bool] = False  # student full recomputation; None: try both
    # precision.cuda_graphs: the student's layers replay as CUDA graphs, which needs tp = pp = 1 and
    # no recomputation (kdtrain/models/cuda_graphs.py); its host time per layer is one replay.
    student_graphs: bool = False
    onpolicy: Optional[Sampling] = None  # None: every step distils on the data
    names: Mapping[str, str] = field(default_factory=lambda: CLI_NAMES, compare=False, repr=False)  # for errors

    def check(self) -> None:
        n = self.names
        for key, v in (("world_size", self.world_size), ("gpus_per_node", self.gpus_per_node),
                       ("seq_len", self.seq_len), ("global_batch", self.global_batch)):
            if v < 1:
                raise ValueError(f"{n[key]}: must be >= 1, got {v}")
        if self.teacher.vocab != self.student.vocab:
            raise ValueError(f"{n['student']}: vocab_size {self.student.vocab} of the student {self.student.name!r} "
                             f"differs from the teacher's {self.teacher.vocab} ({self.teacher.name!r}): "
                             "distillation needs one tokenizer")
        if not 1 <= self.topk <= min(MAX_TOPK, self.teacher.vocab):
            raise ValueError(f"{n['topk']}: must be in [1, {min(MAX_TOPK, self.teacher.vocab)}], got {self.topk}")
        for role, m in (("teacher", self.teacher), ("student", self.student)):
            if self.seq_len > m.max_seq:
                raise ValueError(f"{n['seq_len']}: {self.seq_len} exceeds max_seq_length={m.max_seq} of the {role} "
                                 f"{m.name!r}")
        if self.micro_batches is not None:
            bad = [b for b in self.micro_batches if b < 1 or self.global_batch % b]
            if bad or not self.micro_batches:
                raise ValueError(f"{n['micro_batch']}: {bad or 'none given'}: each must divide {n['global_batch']} "
                                 f"{self.global_batch}")
        if self.depth < 1:
            raise ValueError(f"{n['depth']}: must be >= 1, got {self.depth}")
        if self.student_graphs and self.recompute:
            raise ValueError(f"precision.cuda_graphs: the graphed student layers cannot be recomputed "
                             f"({n['no_recompute']}, or no CUDA graphs)")
        if self.dtype_bytes not in (2, 4) or self.values_bytes not in (2, 4):
            raise ValueError(f"dtype bytes must be 2 (bf16) or 4 (fp32), got {self.dtype_bytes}/{self.values_bytes}")
        if self.onpolicy is not None:
            o = self.onpolicy
            if not 0.0 < o.fraction <= 1.0:
                raise ValueError(f"{n['onpolicy_fraction']}: must be in (0, 1], got {o.fraction}")
            if not 1 <= o.prompt <= self.seq_len:
                raise ValueError(f"{n['prompt_len']}: must be in [1, {n['seq_len']} {self.seq_len}], got {o.prompt}")
            if o.sample_batch < 0:
                raise ValueError(f"{n['sample_batch']}: must be >= 0, got {o.sample_batch}")
        self.profile.check(n["profile"])

    def micro_batch_candidates(self) -> list[int]:
        if self.micro_batches is not None:
            return sorted(set(self.micro_batches))
        return [b for b in range(1, min(self.max_micro_batch, self.global_batch) + 1) if self.global_batch % b == 0]

    def tp_candidates(self, m: ModelShape) -> list[int]:
        return [t for t in range(1, self.gpus_per_node + 1)
                if self.gpus_per_node % t == 0 and m.layout_ok(t, 1)]

    def pp_candidates(self, m: ModelShape) -> list[int]:
        return [p for p in range(1, m.layers + 1) if m.layers % p == 0]

    def layout_candidates(self, role: str) -> list[tuple[int, int]]:
        """(tp, pp) pairs a role may use: what its model allows, and for a graphed student only
        tp = pp = 1."""
        m = self.teacher if role == "teacher" else self.student
        pairs = [(t, q) for t in self.tp_candidates(m) for q in self.pp_candidates(m)]
        if role == "student" and self.student_graphs:
            pairs = [(t, q) for t, q in pairs if t == q == 1]
        return pairs


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def ranks(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp{self.tp}.pp{self.pp}.dp{self.dp}"


@dataclass
class Plan:
    split: str  # "colocated" | "disaggregated"
    teacher: Layout
    student: Layout
    micro_batch: int
    distributed_optimizer: bool
    world_size: int
    global_batch: int
    recompute: bool = False
    step_time: float = math.inf
    sample_time: float = 0.0  # on-policy: seconds the student samples on a sampled step
    memory: dict = field(default_factory=dict)  # "teacher"/"student" (disaggregated) or "rank": RankMemory
    times: dict = field(default_factory=dict)  # named parts of the step, seconds
    bottleneck: str = ""
    reject: Optional[str] = None  # why it does not fit (role, GiB over)

    # -- the interface distill's `split: auto` reads ------------------------------------------
    @property
    def mode(self) -> str:
        """'colocated' or 'disaggregated' (the distill config's ``split.mode``)."""
        return self.split

    @property
    def teacher_offset(self) -> int:
        return 0

    @property
    def student_offset(self) -> int:
        return 0 if self.split == "colocated" else self.teacher.ranks

    @property
    def teacher_ranks(self) -> int:
        return self.teacher.ranks

    @property
    def student_ranks(self) -> int:
        return self.student.ranks

    @property
    def samples_per_s(self) -> float:
        return self.global_batch / self.step_time if self.step_time > 0 else 0.0

    @property
    def fits(self) -> bool:
        return self.reject is None

    teacher_tp = property(lambda self: self.teacher.tp)
    teacher_pp = property(lambda self: self.teacher.pp)
    teacher_dp = property(lambda self: self.teacher.dp)
    student_tp = property(lambda self: self.student.tp)
    student_pp = property(lambda self: self.student.pp)
    student_dp = property(lambda self: self.student.dp)

    def peak_memory(self) -> dict[str, float]:
        """Worst rank's bytes per role (colocated: one figure for the shared rank)."""
        return {k: v.total for k, v in self.memory.items()}

    def label(self) -> str:
        if self.split == "colocated":
            return f"colocated T[{self.teacher}] S[{self.student}]"
        return f"disagg T{self.teacher_ranks}[{self.teacher}] S{self.student_ranks}[{self.student}]"

    def settings(self) -> str:
        """The plan's per-rank settings beside its layouts: micro-batch, ZeRO-1, recompute."""
        return (f"mb={self.micro_batch}" + (" zero1" if self.distributed_optimizer else "")
                + (" recompute" if self.recompute else ""))

    def describe(self) -> str:
        mem = ", ".join(f"{k} {v.total / GiB:.1f} GiB" for k, v in self.memory.items())
        sampling = f", sampling {self.sample_time * 1e3:.1f} ms per sampled step" if self.sample_time else ""
        return (f"{self.label()} {self.settings()}: {self.samples_per_s:.2f} samples/s "
                f"(step {self.step_time * 1e3:.1f} ms{sampling}), {mem}, bottleneck {self.bottleneck}")

    def config_overrides(self) -> dict:
        """The distill config fields this plan sets (``section.field: value``). The teacher comes
        first (ranks ``[0, Wt)``): the placement the plan is priced for."""
        out = {"split.mode": self.split, "teacher.tp": self.teacher.tp, "teacher.pp": self.teacher.pp,
               "teacher.dp": self.teacher.dp, "student.tp": self.student.tp, "student.pp": self.student.pp,
               "student.dp": self.student.dp, "training.micro_batch_size": self.micro_batch,
               "optimizer.distributed": self.distributed_optimizer, "training.recompute": self.recompute,
               "split.teacher_ranks": None, "split.teacher_first": True}
        if self.split == "disaggregated":
            out["split.teacher_ranks"] = self.teacher_ranks
        return out

    def to_json(self) -> dict:
        return {"split": self.split, "teacher_ranks": self.teacher_ranks, "student_ranks": self.student_ranks,
                "teacher": vars(self.teacher), "student": vars(self.student), "micro_batch": self.micro_batch,
                "distributed_optimizer": self.distributed_optimizer, "recompute": self.recompute, "samples_per_s": self.samples_per_s,
                "step_time_s": self.step_time, "sample_time_s": self.sample_time, "bottleneck": self.bottleneck,
                "memory_gib": {k: v.as_gib() for k, v in self.memory.items()},
                "times_s": self.times, "reject": self.reject, "describe": self.describe()}
