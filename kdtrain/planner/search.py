"""Plan search: enumerate colocated and disaggregated splits, reject what does not fit, rank the
rest by predicted samples/s.

A plan fixes the split (colocated or disaggregated with the teacher on ranks ``[0, Wt)``), each
role's ``tp x pp x dp``, the micro-batch size, whether the student uses the distributed
optimizer and (when asked) full activation recomputation. Invariants every enumerated plan satisfies (tested): the roles' spans cover the world
exactly once (colocated: both cover it; disaggregated: ``Wt + Ws = W``, disjoint), ``tp*pp*dp`` is
each role's span, tp divides heads, query groups and ffn and the node size (TP stays inside a
node, groups do not straddle nodes), pp divides layers, both roles' dp divide the micro-batches
per step.

Step time (see timing.py for a role's parts):

    colocated      T = T_teacher(incl. pipeline fill) + T_student + payload time not hidden
                       behind the teacher's forwards (0 when no payload leaves its rank: each
                       student replica's last-stage ranks are the serving teacher replica's,
                       as with one layout for both roles; routing.py)
    disaggregated  T = max(T_teacher + stall, T_student + first payload, T_link)
                   stall = max(0, student gap - (depth + 1) * teacher micro-batch time): the
                   teacher fills its ``depth`` sends in flight and computes one more, then idles
                   while the student reduces gradients, updates and refills its pipeline

On-policy runs (``Problem.onpolicy``: a fraction f of the steps on the student's own samples)
average the two kinds of step, T = (1 - f) T + f T_sampled. A sampled step first has every
student replica write its rows (timing.sampling_time; the windows then reach every rank in one
all-reduce), and only then may the teacher start:

    colocated      T_sampled = T_sample + T
    disaggregated  T_sampled = T_sample + max(T_teacher + its pipeline fill + the student's
                                              work after the last payload (gap + one forward),
                                              T_student + the first payload through the teacher's
                                              stages and the link, T_link)
                   (the teacher idles while the student samples, and cannot run ahead: no
                   sampling time is hidden, T_sampled >= T_sample + T)

Pruning (what keeps 1024 ranks under a second): for a disaggregated split only the 3 fastest
fitting layouts of each role for its span size are paired, and span sizes are limited to
``tp*pp*dp`` with dp dividing the micro-batches per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping, Optional

from ..config import ModelConfig
from .memory import (GiB, ModelShape, RankMemory, payload_nbytes, sampling_bytes, student_stage_memory,
                     teacher_stage_memory)
from .profiles import HardwareProfile, get_profile
from .routing import colocated_routes
from .timing import Placement, RoleTime, allreduce_time, link, sampling_time, student_time, teacher_time

MAX_TOPK = 1024  # the fused loss kernel's limit (kdtrain/config/distill.py)
TOP_PER_SPAN = 3


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

    def describe(self) -> str:
        mem = ", ".join(f"{k} {v.total / GiB:.1f} GiB" for k, v in self.memory.items())
        zero = (" zero1" if self.distributed_optimizer else "") + (" recompute" if self.recompute else "")
        sampling = f", sampling {self.sample_time * 1e3:.1f} ms per sampled step" if self.sample_time else ""
        return (f"{self.label()} mb={self.micro_batch}{zero}: {self.samples_per_s:.2f} samples/s "
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


# ---- cached role models ----------------------------------------------------------------------
@lru_cache(maxsize=1 << 16)
def _teacher_stages(p: Problem, lay: Layout, mb: int, payloads: int) -> tuple[RankMemory, ...]:
    nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes)
    return tuple(teacher_stage_memory(p.teacher, lay.tp, lay.pp, r, p.seq_len, mb, p.topk,
                                      payloads * nb if r == lay.pp - 1 else 0.0, p.dtype_bytes)
                 for r in range(lay.pp))


@lru_cache(maxsize=1 << 16)
def _student_stages(p: Problem, lay: Layout, mb: int, zero: bool, payloads: int,
                    rc: bool = False) -> tuple[RankMemory, ...]:
    nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes)
    m_per = p.global_batch // mb // lay.dp
    rows = p.onpolicy.calls(p.global_batch // lay.dp)[0] if p.onpolicy else 0

    def sampling(r: int) -> float:
        return sampling_bytes(p.student, lay.tp, lay.pp, r, p.seq_len, rows, p.onpolicy.prompt, p.dtype_bytes) \
            if rows else 0.0
    return tuple(student_stage_memory(p.student, lay.tp, lay.pp, lay.dp, r, p.seq_len, mb, m_per,
                                      payloads * nb if r == lay.pp - 1 else 0.0, p.dtype_bytes, zero, rc, sampling(r))
                 for r in range(lay.pp))


@lru_cache(maxsize=1 << 16)
def _teacher_time(p: Problem, lay: Layout, mb: int, offset: int, colocated: bool) -> RoleTime:
    return teacher_time(p.teacher, lay.tp, lay.pp, lay.dp, p.seq_len, mb, p.global_batch // mb // lay.dp, p.topk,
                        p.profile, Placement(offset, p.gpus_per_node), colocated, p.dtype_bytes)


@lru_cache(maxsize=1 << 16)
def _student_time(p: Problem, lay: Layout, mb: int, offset: int, zero: bool, bcast: bool,
                  rc: bool = False) -> RoleTime:
    nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes) if bcast else 0.0
    return student_time(p.student, lay.tp, lay.pp, lay.dp, p.seq_len, mb, p.global_batch // mb // lay.dp,
                        p.profile, Placement(offset, p.gpus_per_node), nb, p.dtype_bytes, zero, rc,
                        graphed=p.student_graphs)


@lru_cache(maxsize=1 << 16)
def _sample_time(p: Problem, lay: Layout) -> float:
    """Seconds of a sampled step before the teacher may start: each student replica samples its
    rows (all replicas at once), then one world all-reduce hands every rank the windows, their
    flags and document positions (int64, kdtrain/training/distill.py). 0 without on-policy steps."""
    if p.onpolicy is None:
        return 0.0
    rows, calls = p.onpolicy.calls(p.global_batch // lay.dp)
    t = sampling_time(p.student, lay.tp, lay.pp, p.seq_len, rows, calls, p.onpolicy.prompt, p.profile, p.dtype_bytes,
                      graphed=p.student_graphs)
    bw, lat = link(p.profile, p.world_size <= p.gpus_per_node)
    return t + allreduce_time(p.global_batch * 3 * (p.seq_len + 1) * 8, p.world_size, bw, lat)


def _worst(stages: tuple[RankMemory, ...]) -> RankMemory:
    return max(stages, key=lambda m: m.total)


def _over(role: str, mem: RankMemory, p: Problem) -> Optional[str]:
    over = mem.total - p.profile.usable_memory
    if over > 0:
        return f"{role} rank needs {mem.total / GiB:.1f} GiB, {over / GiB:.1f} GiB over the usable " \
               f"{p.profile.usable_memory / GiB:.1f} GiB"
    return None


def role_layouts(p: Problem, role: str, ranks: int, mb: int) -> list[Layout]:
    """Every tp x pp x dp of ``ranks`` ranks that the role's model, its options and the batch allow."""
    n_mb = p.global_batch // mb
    return [Layout(tp, pp, ranks // (tp * pp)) for tp, pp in p.layout_candidates(role)
            if ranks % (tp * pp) == 0 and n_mb % (ranks // (tp * pp)) == 0]


def _payload_link(p: Problem, intra: bool) -> tuple[float, float]:
    prof = p.profile
    return (prof.intra_node_bw, prof.intra_node_latency) if intra else (prof.inter_node_bw, prof.inter_node_latency)


def _name_bottleneck(parts: dict[str, float]) -> str:
    total = sum(parts.values()) or 1.0
    name, value = max(parts.items(), key=lambda kv: kv[1])
    return f"{name} ({100 * value / total:.0f}%)"


# ---- evaluation of one plan -----------------------------------------------------------------
def evaluate_colocated(p: Problem, t: Layout, s: Layout, mb: int, zero: bool, rc: bool = False) -> Plan:
    W, G = p.world_size, p.gpus_per_node
    assert t.ranks == W and s.ranks == W, (t, s, W)
    plan = Plan("colocated", t, s, mb, zero, W, p.global_batch, rc)
    # Payloads move as the channel routes them: zero-copy where the student replica's last-stage
    # ranks are all the serving teacher replica's (routing.py).
    routes = colocated_routes((t.tp, t.pp, t.dp), (s.tp, s.pp, s.dp), p.global_batch // mb)
    nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes)
    t_st = _teacher_stages(p, t, mb, 0)
    s_st = _student_stages(p, s, mb, zero, 0, rc)
    # Rank r is on teacher stage r // (tp*dp) and student stage r // (tp*dp) of the other role.
    worst, worst_total = None, -1.0
    for (i, j), n_held in sorted(routes.held.items()):
        a, b = t_st[i], s_st[j]
        # Teacher tensors are freed before the student's step: activations do not add up.
        mem = RankMemory(a.weights + b.weights, b.grads, b.optimizer, max(a.activations, b.activations),
                         n_held * nb)
        if mem.total > worst_total:
            worst, worst_total = mem, mem.total
    plan.memory = {"rank": worst}
    plan.reject = _over("colocated", worst, p)
    tt = _teacher_time(p, t, mb, 0, True)
    st = _student_time(p, s, mb, 0, zero, routes.broadcast, rc)
    payload = 0.0
    busiest = max(routes.sends, routes.receives)
    if busiest:
        bw, lat = _payload_link(p, W <= G)
        payload = max(0.0, busiest * (nb / bw + lat) - tt.total) + nb / bw + lat
    plan.sample_time = _sample_time(p, s)
    f = p.onpolicy.fraction if p.onpolicy else 0.0
    plan.step_time = tt.total + st.total + payload + f * plan.sample_time
    plan.times = {"teacher": tt.total, "student": st.total, "payload": payload, "sampling": f * plan.sample_time}
    parts = {f"teacher {k}": v for k, v in tt.parts().items()}
    parts.update({f"student {k}": v for k, v in st.parts().items()})
    parts["payload"] = payload
    parts["student sampling"] = f * plan.sample_time
    plan.bottleneck = _name_bottleneck(parts)
    return plan


def evaluate_disaggregated(p: Problem, t: Layout, s: Layout, mb: int, zero: bool, rc: bool = False) -> Plan:
    W, G = p.world_size, p.gpus_per_node
    assert t.ranks + s.ranks == W and t.ranks >= 1 and s.ranks >= 1, (t, s, W)
    plan = Plan("disaggregated", t, s, mb, zero, W, p.global_batch, rc)
    # Teacher keeps `depth` sends in flight + the one it is producing; the student as many receives.
    tm = _worst(_teacher_stages(p, t, mb, p.depth + 1))
    sm = _worst(_student_stages(p, s, mb, zero, p.depth + 1, rc))
    plan.memory = {"teacher": tm, "student": sm}
    plan.reject = _over("teacher", tm, p) or _over("student", sm, p)
    tt = _teacher_time(p, t, mb, 0, False)
    st = _student_time(p, s, mb, t.ranks, zero, True, rc)
    nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes)
    bw, lat = _payload_link(p, W <= G)  # both spans inside one node, else across nodes
    m_t, m_s = p.global_batch // mb // t.dp, p.global_batch // mb // s.dp
    x_one = nb / bw + lat
    t_link = max(m_t, m_s) * x_one  # the busiest sender (teacher last stage) or receiver
    # During the student's gap the teacher fills its `depth` sends in flight and computes one more.
    stall = max(0.0, st.gap - (p.depth + 1) * tt.forward_per_microbatch)
    first = max(0.0, x_one - (s.pp - 1) * st.forward_per_microbatch)
    candidates = {"teacher": tt.total + stall, "student": st.total + first, "payload link": t_link}
    role, plan.step_time = max(candidates.items(), key=lambda kv: kv[1])
    plan.times = {"teacher": tt.total, "teacher stall": stall, "student": st.total, "first payload": first,
                  "payload link": t_link}
    sampling = 0.0  # per step, averaged: what sampled steps add over data steps
    if p.onpolicy is not None:
        f, plan.sample_time = p.onpolicy.fraction, _sample_time(p, s)
        # The teacher starts with the samples: it fills its pipeline and the student's first
        # payload waits for one micro-batch through every teacher stage and the link; after the
        # teacher's last payload the student still trains on it, reduces and updates (its gap
        # and one forward), where on a data step the teacher would already be running ahead.
        sampled = plan.sample_time + max(tt.total + (t.pp - 1) * tt.per_microbatch + st.gap + st.forward_per_microbatch,
                                         st.total + t.pp * tt.per_microbatch + x_one, t_link)
        sampling = f * (sampled - plan.step_time)
        plan.step_time += sampling
        plan.times["sampling"] = sampling
    if sampling > max(candidates.values()):
        plan.bottleneck = "student sampling (teacher idle)"
    elif role == "teacher":
        parts = {**tt.parts(), "stall on student gap": stall}
        plan.bottleneck = "teacher: " + _name_bottleneck(parts)
    elif role == "student":
        plan.bottleneck = "student: " + _name_bottleneck({**st.parts(), "first payload": first})
    else:
        plan.bottleneck = f"payload link ({'intra' if W <= G else 'inter'}-node)"
    return plan


# ---- search -----------------------------------------------------------------------------------
@dataclass
class SearchResult:
    plans: list[Plan]  # fitting plans, best first
    rejected: int
    closest_rejects: list[Plan]  # the rejected plans that came closest to fitting
    evaluated: int

    def best(self, split: Optional[str] = None) -> Optional[Plan]:
        for plan in self.plans:
            if split is None or plan.split == split:
                return plan
        return None


def _zero_options(p: Problem, dp: int) -> tuple[bool, ...]:
    if p.distributed_optimizer is not None:
        return (p.distributed_optimizer,)
    return (False, True) if dp > 1 else (False,)


def student_options(p: Problem, dp: int) -> list[tuple[bool, bool]]:
    """(distributed optimizer, recomputation) choices the search tries for a student with ``dp``."""
    rcs = (False, True) if p.recompute is None else (p.recompute,)
    if p.student_graphs:  # graphed layers are never recomputed
        rcs = (False,)
    return [(z, rc) for z in _zero_options(p, dp) for rc in rcs]


def search_plans(p: Problem, splits=("colocated", "disaggregated")) -> SearchResult:
    p.check()
    W = p.world_size
    fitting, rejects, evaluated = [], [], 0

    def keep(plan: Plan):
        nonlocal evaluated
        evaluated += 1
        (fitting if plan.fits else rejects).append(plan)

    for mb in p.micro_batch_candidates():
        if "colocated" in splits:
            t_lays, s_lays = role_layouts(p, "teacher", W, mb), role_layouts(p, "student", W, mb)
            for t in t_lays:
                for s in s_lays:
                    for zero, rc in student_options(p, s.dp):
                        keep(evaluate_colocated(p, t, s, mb, zero, rc))
        if "disaggregated" in splits and W >= 2:
            t_by_span = _best_by_span(p, "teacher", mb, W)
            s_by_span = _best_by_span(p, "student", mb, W)
            for wt, t_best in t_by_span.items():
                for s_lay, (zero, rc) in s_by_span.get(W - wt, ()):
                    for t_lay, _ in t_best:
                        if t_lay.ranks % s_lay.tp:  # the student's TP groups would straddle nodes
                            continue
                        keep(evaluate_disaggregated(p, t_lay, s_lay, mb, zero, rc))
    fitting.sort(key=lambda pl: pl.step_time)
    rejects.sort(key=lambda pl: max(m.total for m in pl.memory.values()))
    return SearchResult(fitting, len(rejects), rejects[:5], evaluated)


def _best_by_span(p: Problem, role: str, mb: int, W: int) -> dict[int, list[tuple[Layout, tuple[bool, bool]]]]:
    """Span size -> the TOP_PER_SPAN fastest (layout, (zero, recompute)) of ``role`` that fit alone (role
    time depends on its own layout only; the rank offset matters only for node crossings,
    which the full evaluation prices)."""
    n_mb = p.global_batch // mb
    out: dict[int, list] = {}
    for tp, pp in p.layout_candidates(role):
        for dp in (d for d in range(1, n_mb + 1) if n_mb % d == 0):
            ranks = tp * pp * dp
            if ranks >= W:
                break
            lay = Layout(tp, pp, dp)
            if role == "teacher":
                mem = _worst(_teacher_stages(p, lay, mb, p.depth + 1))
                opts = [(lay, (False, False), _teacher_time(p, lay, mb, 0, False).total)] \
                    if mem.total <= p.profile.usable_memory else []
            else:
                opts = []
                for zero, rc in student_options(p, dp):
                    mem = _worst(_student_stages(p, lay, mb, zero, p.depth + 1, rc))
                    if mem.total <= p.profile.usable_memory:
                        t_s = _student_time(p, lay, mb, W - ranks, zero, True, rc).total
                        if p.onpolicy is not None:
                            t_s += p.onpolicy.fraction * _sample_time(p, lay)
                        opts.append((lay, (zero, rc), t_s))
            out.setdefault(ranks, []).extend(opts)
    return {r: [(lay, z) for lay, z, _ in sorted(v, key=lambda x: x[2])[:TOP_PER_SPAN]]
            for r, v in out.items() if v}


def make_problem(teacher_model, student_model, world_size: int, gpus_per_node: int, seq_len: int,
                 global_batch: int, topk: int = 64, profile="h100-80gb", **kw) -> Problem:
    """A :class:`Problem` from model configs (``ModelConfig`` or ``ModelShape``) and a profile (name,
    JSON path or ``HardwareProfile``); ``kw``: the other ``Problem`` fields."""
    prof = get_profile(profile, kw.get("names", CLI_NAMES)["profile"])
    return Problem(ModelShape.of(teacher_model), ModelShape.of(student_model), world_size, gpus_per_node, seq_len,
                   global_batch, topk, prof, **kw)


def auto_plan(teacher_model: ModelConfig, student_model: ModelConfig, world_size: int, gpus_per_node: int,
              seq_len: int, global_batch: int, micro_batch: Optional[int] = None, topk: int = 64, profile=None, *,
              values_bytes: int = 4, depth: int = 2, distributed_optimizer: Optional[bool] = None,
              dtype_bytes: int = 2, recompute: Optional[bool] = False,
              student_graphs: bool = False, onpolicy: Optional[Sampling] = None,
              names: Mapping[str, str] = CLI_NAMES) -> tuple[Plan, Optional[Plan]]:
    """Pick the split for ``split: auto``: ``(best, runner_up)`` by predicted samples/s.

    Arguments: the teacher and student ``ModelConfig``; ``world_size`` ranks with ``gpus_per_node``
    per node; ``seq_len`` tokens per sample; ``global_batch`` samples per step; ``micro_batch``
    (samples per micro-batch; ``None`` lets the planner choose among the divisors of
    ``global_batch`` up to 16); ``topk`` (``teacher.topk``); ``profile``: a built-in profile name
    (``h100-80gb``, ``h200``, ``a100-80gb``, ``a100-40gb``, ``cpu``), a ``kdtrain calibrate`` JSON
    path or a ``HardwareProfile`` (``None``: ``h100-80gb``). Keyword-only: ``values_bytes`` 4 or 2
    (``teacher.values_dtype`` fp32/bf16), ``depth`` (``split.depth``), ``distributed_optimizer``
    (``optimizer.distributed``; ``None`` lets the planner choose), ``dtype_bytes`` (2 for bf16
    weights and activations, 4 for fp32), ``recompute`` (student full recomputation: ``False``
    never, ``True`` always, ``None`` planner's choice), ``student_graphs``
    (``precision.cuda_graphs``: only student layouts with tp = pp = 1, host time of graph replays),
    ``onpolicy`` (a :class:`Sampling` for runs with ``onpolicy.fraction`` > 0: the sampled steps'
    time and key/value cache), ``names`` (what input errors call the inputs: ``CLI_NAMES``, or
    ``CONFIG_NAMES`` for a run config's ``split.mode: auto``).

    Each plan exposes ``mode`` ('colocated' | 'disaggregated'), ``teacher_ranks`` /
    ``student_ranks`` (disaggregated: the teacher owns ranks ``[0, teacher_ranks)``, the student
    the rest; colocated: both own all ``world_size`` ranks), ``teacher_offset`` /
    ``student_offset``, ``teacher_tp/pp/dp``, ``student_tp/pp/dp``, ``micro_batch``,
    ``distributed_optimizer``, ``samples_per_s`` (predicted), ``step_time`` (s),
    ``peak_memory()`` (bytes of the worst rank per role), ``bottleneck``, ``describe()`` (one
    line for the log) and ``config_overrides()`` (the distill config fields it sets).

    ``runner_up`` is the best plan of the other split when one fits, else the second best plan,
    else ``None``. Raises ``ValueError`` when the inputs are invalid or no plan fits (the message
    names the role of the closest plan and how many GiB it is over).
    """
    mbs = None if micro_batch is None else (micro_batch,)
    p = make_problem(teacher_model, student_model, world_size, gpus_per_node, seq_len, global_batch, topk,
                     "h100-80gb" if profile is None else profile, micro_batches=mbs, values_bytes=values_bytes,
                     depth=depth, distributed_optimizer=distributed_optimizer, dtype_bytes=dtype_bytes,
                     recompute=recompute, student_graphs=student_graphs, onpolicy=onpolicy, names=names)
    res = search_plans(p)
    if not res.plans:
        why = res.closest_rejects[0].reject if res.closest_rejects else (
            "no tp x pp x dp satisfies the layout rules (tp divides heads, query groups, ffn and the GPUs "
            "per node; pp divides the layers; dp divides global_batch / micro_batch)")
        raise ValueError(f"split.mode: auto found no plan for {p.teacher.name} -> {p.student.name} on {world_size} "
                         f"ranks (seq {seq_len}, global batch {global_batch}): {why}")
    best = res.plans[0]
    other = res.best("disaggregated" if best.split == "colocated" else "colocated")
    runner_up = other or (res.plans[1] if len(res.plans) > 1 else None)
    return best, runner_up
