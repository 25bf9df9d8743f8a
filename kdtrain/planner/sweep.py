"""``kdtrain plan --sweep``: vary one quantity, report the best plan of each split and where the
best regime changes, and plot predicted samples/s per regime (PNG, matplotlib Agg).

Each point also evaluates the closed-form condition (inflection.py) so the report shows where the
formula and the search agree.

Quantities: ``world_size``, ``teacher_size`` (the teacher's depth scaled by each factor: parameters
scale about linearly, width and vocabulary stay), ``seq_len``, ``k`` (top-k) and ``inter_node_bw``
(GB/s per GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..optional import need
from .memory import ModelShape
from .inflection import condition
from .problem import MAX_TOPK, Plan, Problem
from .search import search_plans

QUANTITIES = {
    "world_size": [8, 16, 32, 64, 128, 256, 512, 1024],
    "teacher_size": [0.25, 0.5, 1.0, 2.0, 4.0],
    "seq_len": [512, 1024, 2048, 4096, 8192],
    "k": [8, 16, 64, 256, 1024],
    "inter_node_bw": [1.0, 3.0, 6.25, 12.5, 25.0, 50.0, 100.0],
}
AXIS_LABEL = {"world_size": "world size (GPUs)", "teacher_size": "teacher parameters (B)",
              "seq_len": "sequence length", "k": "top-k", "inter_node_bw": "inter-node bandwidth (GB/s per GPU)"}


@dataclass
class SweepPoint:
    value: float
    x: float  # plotted abscissa (teacher_size: parameters in billions)
    colocated: Optional[Plan]
    disaggregated: Optional[Plan]
    closed_form: Optional[str] = None  # the regime the closed-form condition picks

    @property
    def best(self) -> Optional[str]:
        c, d = self.colocated, self.disaggregated
        if c is None and d is None:
            return None
        if c is None or (d is not None and d.step_time < c.step_time):
            return "disaggregated"
        return "colocated"


def vary(p: Problem, quantity: str, value) -> tuple[Problem, float]:
    """The problem with one quantity changed, and the plot abscissa."""
    if quantity == "world_size":
        return dataclasses.replace(p, world_size=int(value)), float(value)
    if quantity == "seq_len":
        return dataclasses.replace(p, seq_len=int(value)), float(value)
    if quantity == "k":
        return dataclasses.replace(p, topk=int(value)), float(value)
    if quantity == "inter_node_bw":
        return dataclasses.replace(p, profile=p.profile.replace(inter_node_bw=float(value) * 1e9)), float(value)
    if quantity == "teacher_size":
        layers = max(1, round(p.teacher.layers * float(value)))
        t = dataclasses.replace(p.teacher, layers=layers, name=f"{p.teacher.name}x{value:g}")
        params = t.layers * _layer_params(t) + 2 * t.vocab * t.hidden
        return dataclasses.replace(p, teacher=t), params / 1e9
    raise ValueError(f"--sweep: unknown quantity {quantity!r} (choose from {', '.join(QUANTITIES)})")


def _layer_params(m: ModelShape) -> int:
    return m.hidden * (m.q_width + m.kv_width) + m.q_width * m.hidden + (3 if m.gated else 2) * m.hidden * m.ffn


def default_values(p: Problem, quantity: str) -> list:
    """The built-in values of ``quantity`` that the models allow (sequence length within both
    models' ``max_seq_length``, top-k within the vocabulary)."""
    values = QUANTITIES[quantity]
    if quantity == "seq_len":
        values = [v for v in values if v <= min(p.teacher.max_seq, p.student.max_seq)] or [p.seq_len]
    if quantity == "k":
        values = [v for v in values if v <= min(MAX_TOPK, p.teacher.vocab)] or [p.topk]
    return values


def sweep(p: Problem, quantity: str, values=None) -> list[SweepPoint]:
    if quantity not in QUANTITIES:
        raise ValueError(f"--sweep: unknown quantity {quantity!r} (choose from {', '.join(QUANTITIES)})")
    points = []
    for v in values or default_values(p, quantity):
        q, x = vary(p, quantity, v)
        res = search_plans(q)
        c, d = res.best("colocated"), res.best("disaggregated")
        verdict = None
        if c is not None:
            verdict = "disaggregated" if condition(q, c.step_time).disaggregated_wins else "colocated"
        elif d is not None:
            verdict = "disaggregated"
        points.append(SweepPoint(v, x, c, d, verdict))
    return points


def transitions(points: list[SweepPoint]) -> list[tuple[float, float, str, str]]:
    """(value before, value after, regime before, regime after) wherever the best regime changes."""
    out = []
    for a, b in zip(points, points[1:]):
        if a.best and b.best and a.best != b.best:
            out.append((a.value, b.value, a.best, b.best))
    return out


def report(points: list[SweepPoint], quantity: str) -> str:
    lines = [f"{quantity:>14}  {'colocated/s':>12}  {'disagg/s':>10}  {'best':<13}  {'closed form':<13}  best plan"]
    for pt in points:
        c = f"{pt.colocated.samples_per_s:12.2f}" if pt.colocated else f"{'-':>12}"
        d = f"{pt.disaggregated.samples_per_s:10.2f}" if pt.disaggregated else f"{'-':>10}"
        plan = pt.colocated if pt.best == "colocated" else pt.disaggregated
        lines.append(f"{pt.value:>14g}  {c}  {d}  {pt.best or 'no plan':<13}  {pt.closed_form or '-':<13}  "
                     f"{plan.label() + ' ' + plan.settings() if plan else ''}")
    changes = transitions(points)
    if changes:
        for a, b, ra, rb in changes:
            lines.append(f"regime change: {ra} -> {rb} between {quantity}={a:g} and {quantity}={b:g}")
    else:
        lines.append(f"no regime change over the swept {quantity} values")
    return "\n".join(lines)


def to_json(points: list[SweepPoint], quantity: str) -> dict:
    return {"quantity": quantity, "points": [
        {"value": pt.value, "x": pt.x, "best": pt.best, "closed_form": pt.closed_form,
         "colocated": pt.colocated.to_json() if pt.colocated else None,
         "disaggregated": pt.disaggregated.to_json() if pt.disaggregated else None} for pt in points],
        "transitions": [{"before": a, "after": b, "from": ra, "to": rb} for a, b, ra, rb in transitions(points)]}


def _draw(ax, points: list[SweepPoint], quantity: str, title: str) -> None:
    # Against the world size, samples/s per GPU: total throughput spans decades and hides the gap.
    per_gpu = quantity == "world_size"
    for split, style in (("colocated", "o-"), ("disaggregated", "s--")):
        xs = [pt.x for pt in points if getattr(pt, split)]
        ys = [getattr(pt, split).samples_per_s / (pt.x if per_gpu else 1.0) for pt in points if getattr(pt, split)]
        if xs:
            ax.plot(xs, ys, style, label=split, markersize=4)
    if quantity in ("world_size", "k", "inter_node_bw", "seq_len"):
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if quantity in ("seq_len", "teacher_size"):
        ax.set_yscale("log")
    # Shade every interval where the best regime changes, labelled with the new regime.
    for a, b, _, rb in transitions(points):
        xa = next(pt.x for pt in points if pt.value == a)
        xb = next(pt.x for pt in points if pt.value == b)
        ax.axvspan(xa, xb, color="grey", alpha=0.18)
        ax.text((xa * xb) ** 0.5 if ax.get_xscale() == "log" else (xa + xb) / 2, 0.04, f"-> {rb}",
                transform=ax.get_xaxis_transform(), ha="center", fontsize=7)
    ax.set_xlabel(AXIS_LABEL[quantity], fontsize=8)
    ax.set_ylabel("predicted samples/s" + (" per GPU" if per_gpu else ""), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot(points: list[SweepPoint], quantity: str, path: str, title: str = "") -> str:
    """One sweep as a PNG: predicted samples/s of the best plan of each regime."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    _draw(ax, points, quantity, title or f"best plan per regime vs {quantity}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(sweeps: dict[str, list[SweepPoint]], path: str, title: str = "") -> str:
    """Several sweeps (quantity -> points) as one PNG, one panel each."""
    plt = _pyplot()
    n = len(sweeps)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), dpi=100, squeeze=False)
    for ax, (quantity, points) in zip(axes.flat, sweeps.items()):
        _draw(ax, points, quantity, f"vs {AXIS_LABEL[quantity]}")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pyplot():
    matplotlib = need("matplotlib", "the sweep's chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
