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

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional

from ..config import ModelConfig
from .memory import (GiB, ModelShape, RankMemory, payload_nbytes, sampling_bytes, student_stage_memory,
                     teacher_stage_memory)
from .problem import CLI_NAMES, Layout, Plan, Problem, Sampling
from .profiles import get_profile
from .routing import colocated_routes
from .timing import Placement, RoleTime, allreduce_time, link, sampling_time, student_time, teacher_time

TOP_PER_SPAN = 3


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
