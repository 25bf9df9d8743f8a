"""When does the disaggregated split beat the colocated one? The closed-form condition.

Every role's step in the time model (timing.py) has the form ``T = B c / n + g``: ``B`` samples per
step, ``n`` ranks of the role, ``c`` its GPU-seconds per sample on the slowest pipeline stage
(``c = t_mb * tp * pp / micro_batch``, with ``t_mb`` one micro-batch's compute, TP all-reduces and
pipeline hops) and ``g`` what does not shrink with more ranks (the student's pipeline bubble,
data-parallel gradient reduction and optimizer). Write ``a = B c_t`` and ``b = B c_s``.

Disaggregated, ``W_t + W_s = W``, the roles run concurrently and the step is the slowest of

    teacher  a / W_t + sigma    sigma = max(0, student gap - (depth + 1) * teacher forward per micro-batch)
    student  b / W_s + g        g = g_s + x_1, x_1 = first payload of a step not hidden by the fill
    link     max(N / dp_t, N / dp_s) * (payload bytes / BW + latency),  N = B / micro_batch

Over real ``W_t`` the first two cross where ``a / (T - sigma) + b / (T - g) = W``, i.e. at the
larger root of

    W T^2 - (W (sigma + g) + a + b) T + W sigma g + a g + b sigma = 0
    T* = [W (sigma + g) + a + b + sqrt((W (g - sigma) + b - a)^2 + 4 a b)] / (2 W)
    W_t* = a / (T* - sigma)

Because one term falls and the other rises with ``W_t``, the best allowed span (``W_t`` a multiple
of ``tp_t pp_t`` with ``dp_t | N``, ``W_s`` likewise, ``tp_s | W_t``) is one of the two allowed
spans around ``W_t*``. Disaggregated beats colocated iff that rounded step, with the link term,
is below the colocated step ``T_c`` (best colocated plan: both models on every GPU, so its
layouts are those whose memory headroom fits both).

First order in the fixed terms, ``T* = (a + b) / W + (g b + sigma a) / (a + b)``: with
``rho = c_t / c_s`` (the teacher/student FLOP ratio times the ratio of achieved rates) and the
colocated step ``T_c = B (c_t^c + c_s^c) / W + g_c``, disaggregated wins iff

    B [(c_t + c_s) - (c_t^c + c_s^c)] / W  <  g_c - (g + rho sigma) / (1 + rho)

so when colocation's headroom forces costlier layouts (right-hand c's larger) it wins at every
world size, and otherwise it wins above ``W* = B dc / dg``. docs/planner.md has the derivation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .memory import payload_nbytes
from .problem import Layout, Problem
from .search import _student_stages, _student_time, _teacher_stages, _teacher_time, _worst, search_plans, \
    student_options


def disaggregated_optimum(a: float, b: float, g: float, sigma: float, W: float) -> tuple[float, float]:
    """``(T*, W_t*)``: the smallest ``max(a / W_t + sigma, b / (W - W_t) + g)`` over real ``W_t``.

    The larger root of ``W T^2 - (W (sigma + g) + a + b) T + W sigma g + a g + b sigma = 0``;
    its discriminant ``(W (g - sigma) + b - a)^2 + 4 a b`` is never negative and the root exceeds
    ``max(sigma, g)`` (the quadratic is <= 0 there)."""
    if a <= 0:
        return b / W + g, 0.0
    if b <= 0:
        return a / W + sigma, float(W)
    lin = W * (sigma + g) + a + b
    disc = (W * (g - sigma) + b - a) ** 2 + 4.0 * a * b
    T = (lin + math.sqrt(disc)) / (2.0 * W)
    return T, a / (T - sigma)


@dataclass
class Condition:
    """The inputs and outcome of the closed-form condition for one problem."""

    flop_ratio: float  # teacher forward FLOPs / student training FLOPs, per sample
    cost_ratio: float  # rho = c_t / c_s (FLOP ratio x ratio of achieved rates)
    colocated_step: float  # T_c, seconds
    step: float  # the closed form's disaggregated step at the rounded split (inf: none)
    continuous_step: float  # T*
    teacher_ranks_star: float  # W_t*
    split: Optional[tuple[int, int]]  # (W_t, W_s) at the rounded optimum
    micro_batch: int = 0
    teacher: Optional[Layout] = None
    student: Optional[Layout] = None
    c_teacher: float = 0.0  # GPU-seconds per sample
    c_student: float = 0.0
    g_student: float = 0.0  # fixed seconds per step (with the first payload)
    sigma: float = 0.0  # teacher stall per step
    link_time: float = 0.0

    @property
    def disaggregated_wins(self) -> bool:
        return self.step < self.colocated_step

    def summary(self) -> str:
        verdict = "disaggregated" if self.disaggregated_wins else "colocated"
        if self.split is None:
            return f"rho={self.cost_ratio:.2f}: no disaggregated split exists -> colocated"
        return (f"rho={self.cost_ratio:.2f} (FLOP ratio {self.flop_ratio:.2f}), mb={self.micro_batch}: "
                f"W_t*={self.teacher_ranks_star:.1f} -> {self.split[0]}+{self.split[1]} "
                f"T[{self.teacher}] S[{self.student}], T_d={self.step * 1e3:.1f} ms vs "
                f"T_c={self.colocated_step * 1e3:.1f} ms -> {verdict}")


def flop_ratio(p: Problem) -> float:
    """Teacher forward FLOPs per sample over student forward+backward FLOPs per sample."""
    def fwd(m):
        return m.layers * m.layer_forward_flops(p.seq_len) + m.output_forward_flops()
    return fwd(p.teacher) / (3 * fwd(p.student))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _allowed_spans(W: int, n_mb: int, t_unit: int, s_unit: int, s_tp: int) -> list[int]:
    """Teacher span sizes W_t with W_t = t_unit * dp_t, W - W_t = s_unit * dp_s, dp_t and dp_s
    dividing the micro-batches per step, and the student's TP groups starting on a TP boundary."""
    out = []
    for dt in _divisors(n_mb):
        wt = t_unit * dt
        ws = W - wt
        if ws < 1:
            break
        if ws % s_unit == 0 and n_mb % (ws // s_unit) == 0 and wt % s_tp == 0:
            out.append(wt)
    return out


def _nearest_divisor(n: int, x: float) -> int:
    return min(_divisors(n), key=lambda d: (abs(math.log(d / max(x, 1e-9))), d))


def condition(p: Problem, colocated_step: Optional[float] = None) -> Condition:
    """Evaluate the closed-form condition. ``colocated_step``: ``T_c`` if known, else the best
    colocated plan's step time (from the colocated enumeration alone).

    For every micro-batch size and every pair of role layouts (tp, pp; the student's optimizer
    options) that fit on their own GPUs, the role costs ``c`` and ``g`` give ``T*`` and ``W_t*`` in
    closed form; the rounded split and the link term give the step. No span is enumerated."""
    if colocated_step is None:
        best_c = search_plans(p, splits=("colocated",)).best()
        colocated_step = best_c.step_time if best_c else math.inf
    T_c, W, B = colocated_step, p.world_size, p.global_batch
    best = Condition(flop_ratio(p), math.nan, T_c, math.inf, math.inf, math.nan, None)
    if W < 2:
        return best
    usable = p.profile.usable_memory
    for mb in p.micro_batch_candidates():
        n_mb = B // mb
        nb = payload_nbytes(p.seq_len, mb, p.topk, p.values_bytes)
        bw, lat = ((p.profile.intra_node_bw, p.profile.intra_node_latency) if W <= p.gpus_per_node
                   else (p.profile.inter_node_bw, p.profile.inter_node_latency))
        x_one = nb / bw + lat
        teachers = []
        for tp, pp in p.layout_candidates("teacher"):
            lay = Layout(tp, pp, 1)
            if tp * pp >= W or _worst(_teacher_stages(p, lay, mb, p.depth + 1)).total > usable:
                continue
            tt = _teacher_time(p, lay, mb, 0, False)
            teachers.append((lay, tt.per_microbatch * tp * pp / mb, tt.forward_per_microbatch))
        for t_lay, c_t, t_fwd in teachers:
            a = B * c_t
            for s_tp, s_pp in p.layout_candidates("student"):
                unit = s_tp * s_pp
                if unit >= W:
                    continue
                # c_s does not depend on dp; g (reduction, ZeRO share) and memory (1F1B depth)
                # do: evaluate them at the dp of the compute-only split W_s = W c_s / (c_t + c_s).
                one = _student_time(p, Layout(s_tp, s_pp, 1), mb, 0, False, True)
                c_s0 = one.per_microbatch * unit / mb
                dp = _nearest_divisor(n_mb, W * c_s0 / (c_t + c_s0) / unit)
                s_lay = Layout(s_tp, s_pp, dp)
                for zero, rc in student_options(p, dp):
                    st = _student_time(p, s_lay, mb, max(0, W - s_lay.ranks), zero, True, rc)
                    c_s = st.per_microbatch * unit / mb
                    sigma = max(0.0, st.gap - (p.depth + 1) * t_fwd)
                    first = max(0.0, x_one - (s_pp - 1) * st.forward_per_microbatch)
                    g = st.bubble + st.dp_comm + st.optimizer + first
                    cond = _rounded(p, T_c, a, B * c_s, g, sigma, mb, x_one, t_lay, s_lay, zero, rc)
                    if cond is not None and cond.step < best.step:
                        cond.micro_batch, cond.c_teacher, cond.c_student = mb, c_t, c_s
                        cond.cost_ratio = c_t / c_s
                        best = cond
    return best


def _rounded(p: Problem, T_c: float, a: float, b: float, g: float, sigma: float, mb: int, x_one: float,
             t_lay: Layout, s_lay: Layout, zero: bool, rc: bool) -> Optional[Condition]:
    """The closed form at the allowed spans around W_t* (the step is quasi-convex in W_t).

    ``g`` and ``sigma`` locate W_t*; at each of the two spans both roles' terms are then taken at
    that span's own dp and rank offset (whether a gradient reduction or a pipeline hop crosses
    nodes depends on both), and a span whose student does not fit is skipped."""
    W, n_mb = p.world_size, p.global_batch // mb
    T_star, wt_star = disaggregated_optimum(a, b, g, sigma, W)
    t_unit, s_unit = t_lay.tp * t_lay.pp, s_lay.tp * s_lay.pp
    spans = _allowed_spans(W, n_mb, t_unit, s_unit, s_lay.tp)
    below = [w for w in spans if w <= wt_star]
    above = [w for w in spans if w >= wt_star]
    out = None
    for wt in sorted(({max(below)} if below else set()) | ({min(above)} if above else set())):
        ws = W - wt
        s_at = Layout(s_lay.tp, s_lay.pp, ws // s_unit)
        if _worst(_student_stages(p, s_at, mb, zero, p.depth + 1, rc)).total > p.profile.usable_memory:
            continue
        t_at = Layout(t_lay.tp, t_lay.pp, wt // t_unit)
        tt, st = _teacher_time(p, t_at, mb, 0, False), _student_time(p, s_at, mb, wt, zero, True, rc)
        # tt.total = a / W_t and st.total = b / W_s + g_s, with the hops and reductions priced
        # where these ranks sit.
        first = max(0.0, x_one - (s_lay.pp - 1) * st.forward_per_microbatch)
        g_at = st.bubble + st.dp_comm + st.optimizer + first
        sigma_at = max(0.0, st.gap - (p.depth + 1) * tt.forward_per_microbatch)
        link = max(n_mb // t_at.dp, n_mb // s_at.dp) * x_one
        step = max(tt.total + sigma_at, st.total + first, link)
        if out is None or step < out.step:
            out = Condition(flop_ratio(p), 0.0, T_c, step, T_star, wt_star, (wt, ws), teacher=t_at, student=s_at,
                            g_student=g_at, sigma=sigma_at, link_time=link)
    return out
