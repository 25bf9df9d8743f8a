"""Where checkpoint pieces sit: boxes of a global tensor, and the copy of their overlap.

A piece (checkpoint.py) is a rank's local slice of one global parameter: along its sharded
dimension ``dim`` its values cover the ``(global_start, global_stop, local_start)`` ranges, every
other dimension whole; a distributed optimizer's piece may hold only flat elements ``[start,
stop)`` of the local tensor (``flat``, ``local_shape``). Any piece is cut into boxes, each a view of
its values with the global coordinates of its first element and its extent in every dimension.
Along ``dim`` a local index i in a range (g0, g1, l0) is global index g0 + i - l0 (indices in no
range, vocabulary padding, map nowhere); in every other dimension local and global indices agree.
A flat part is first cut into row-major boxes: a partial leading row, whole rows, a partial
trailing row (recursively in more dimensions), each a contiguous run of the 1-D values. Two pieces
of one parameter then overlap where two of their boxes do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def flat_boxes(shape, start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Flat elements [start, stop) of a row-major tensor of ``shape`` as boxes ``(lo, hi, first)``:
    local index bounds and the box's first element's offset from ``start``."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start,), (stop,), 0)]
    inner = math.prod(shape[1:])
    r0, r1 = start // inner, (stop - 1) // inner  # first and last row touched
    if r0 == r1:
        return [((r0,) + lo, (r0 + 1,) + hi, first)
                for lo, hi, first in flat_boxes(shape[1:], start - r0 * inner, stop - r0 * inner)]
    out = []
    full0 = r0 if start == r0 * inner else r0 + 1
    full1 = r1 + 1 if stop == (r1 + 1) * inner else r1
    if full0 > r0:  # a partial leading row
        out += flat_boxes(shape, start, full0 * inner)
    if full1 > full0:
        out.append(((full0,) + (0,) * (len(shape) - 1), (full1,) + tuple(shape[1:]), full0 * inner - start))
    if full1 <= r1:  # a partial trailing row
        out += [(lo, hi, first + full1 * inner - start) for lo, hi, first in flat_boxes(shape, full1 * inner, stop)]
    return out


def boxes(piece: dict, values: Optional[torch.Tensor] = None) -> list[tuple[list[int], list[int], Optional[torch.Tensor]]]:
    """A piece (header or stored piece; ``values``: its tensor, or None for the extents only) as
    ``(global lo, global hi, view)`` boxes."""
    dim, ranges = piece["dim"], piece["ranges"]
    if "flat" in piece:
        shape = list(piece["local_shape"])
        blocks = [(lo, hi, None if values is None else values[first: first + math.prod(h - l for l, h in zip(lo, hi))]
                   .view([h - l for l, h in zip(lo, hi)]))
                  for lo, hi, first in flat_boxes(shape, *piece["flat"])]
    else:
        if values is not None:
            shape = list(values.shape)
        else:  # the header of a whole piece: other dimensions are global, padding rows are not needed
            shape = list(piece["global_shape"]) or [1]
            shape[dim] = max((l0 + g1 - g0 for g0, g1, l0 in ranges), default=0)
        blocks = [((0,) * len(shape), tuple(shape), values)]
    out = []
    for lo, hi, view in blocks:
        for g0, g1, l0 in ranges:
            x0, x1 = max(l0, lo[dim]), min(l0 + g1 - g0, hi[dim])
            if x0 >= x1:
                continue
            glo, ghi = list(lo), list(hi)
            glo[dim], ghi[dim] = g0 + x0 - l0, g0 + x1 - l0
            out.append((glo, ghi, None if view is None else view.narrow(dim, x0 - lo[dim], x1 - x0)))
    return out


def overlaps(src_boxes, dst_boxes) -> bool:
    """Whether ``copy_boxes`` of the two would copy anything."""
    return any(all(max(a, c) < min(b, d) for a, b, c, d in zip(slo, shi, dlo, dhi))
               for slo, shi, _ in src_boxes for dlo, dhi, _ in dst_boxes)


def copy_boxes(src_boxes, dst_boxes) -> int:
    """Copy every intersection of a source box with a destination box; returns the values copied."""
    n = 0
    for slo, shi, a in src_boxes:
        for dlo, dhi, b in dst_boxes:
            lo = [max(x, y) for x, y in zip(slo, dlo)]
            hi = [min(x, y) for x, y in zip(shi, dhi)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            sa, sb = a, b
            for d, (l, h) in enumerate(zip(lo, hi)):
                sa, sb = sa.narrow(d, l - slo[d], h - l), sb.narrow(d, l - dlo[d], h - l)
            sb.copy_(sa)
            n += sb.numel()
    return n


def copy_overlap(src: torch.Tensor, src_dim: int, src_ranges, dst: torch.Tensor, dst_dim: int, dst_ranges) -> int:
    """Copy the intersection of two whole pieces of one global tensor (values ``src`` and ``dst``,
    each sharded along its dimension over its ranges); returns the number of values."""
    return copy_boxes(boxes({"dim": src_dim, "ranges": src_ranges}, src),
                       boxes({"dim": dst_dim, "ranges": dst_ranges}, dst))
