"""Time model: seconds per training step of each role, from FLOPs, bytes and a hardware profile.

Per micro-batch of ``n = seq * micro_batch`` tokens on the slowest pipeline stage:

    compute   = max(device, host)                  (the host launches ahead of the device)
    device    = stage FLOPs / profile.achieved_flops(n, smallest TP-sharded width)
                + passes * layers/pp * n * elementwise_width * elementwise_bytes / HBM bw
                (stage FLOPs = layers/pp * layer FLOPs (+ output layer on the last stage) / tp;
                 training = 3 x forward, 4 x with full recomputation)
    host      = passes * layers/pp * layer_overhead_s
                (graphed layers, precision.cuda_graphs: one replay per layer forward and one per
                 backward, GRAPH_REPLAY_S each, whatever the layer does)
    logits    = memory-bound passes over the vocab-parallel logits (top-k / KD loss) / HBM bw
    tp comm   = 2 ring all-reduces of [n, hidden] per layer per pass (attention out, MLP out):
                2 (t-1)/t * bytes / bw + 2 (t-1) * latency
    pp comm   = one [n, hidden] activation (and its gradient) per stage boundary

A role's step over M micro-batches per replica:

    teacher (forward only):  (M + pp - 1) * t_f             colocated: the fill is paid every step
                              M * t_f                       disaggregated: runs on across steps
    student (1F1B):          (M + pp - 1) * (t_f + t_b)     the (pp - 1) part is the bubble
                             + dp gradient all-reduce (fp32 buffer) [+ tied-embedding sync]
                               (ZeRO-1: a reduce-scatter of it and an all-gather of the
                               updated parameters in the model dtype instead)
                             + optimizer (memory-bound: fused AdamW over the owned fp32 state,
                               gradient zero / norm / clip over the stage)

On-policy sampling (a student replica writing its rows of a step, models/generate.py), per call
of r rows: one forward over the P prompt positions, then one forward per decoded position, each
through every pipeline stage in turn (one hop per boundary):

    token     = max(device, host) + tp comm + pp hops
    device    = max(bytes / HBM bw, FLOPs / profile.achieved_flops(r, width))
                bytes = every weight on the tensor rank (d * params/tp) + the key/value cache read
                        (layers * r * context * kv/tp * d, context = P + decoded/2 on average)
    host      = layers * decode_layer_s + decode_token_s   (a cached forward per position, and what
                the rest of the position costs: output layer, draw, bookkeeping; calibrated apart
                from training passes; with precision.cuda_graphs the layers are one graph replay)
    tp comm   = 2 all-reduces of [r, hidden] per layer + 3 small ones for the draw

The decoded positions are an upper bound (S + 1 - P): a call ends early when every row has
stopped.

Collective bandwidth is the intra-node (NVLink) figure when the group lies inside one node, else
the inter-node per-GPU NIC figure (ring collectives are limited by their slowest hop).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .memory import ModelShape, owned_params, stage_params
from .profiles import HardwareProfile


ADAM_BYTES = 28  # HBM bytes per owned parameter of one fused AdamW step (see student_time)
GRAD_BUFFER_BYTES = 24  # zero + norm + clip of the fp32 gradient buffer, per parameter
# Host time of one graphed layer's forward or backward (kdtrain/models/cuda_graphs.py): the graphed
# autograd node's Python, the copy into the static input buffer and one graph launch. An estimate
# (tens of microseconds on a server CPU), not yet calibrated; it matters only when it is all the
# host does, i.e. against the layer's device time, which it is far below.
GRAPH_REPLAY_S = 60e-6


@dataclass(frozen=True)
class Placement:
    """Where a role's ranks sit: the span's first rank and the node size."""

    rank_offset: int
    gpus_per_node: int

    def node(self, rank: int) -> int:
        return rank // self.gpus_per_node


def group_in_one_node(pl: Placement, tp: int, pp: int, dp: int, dim: str) -> bool:
    """True when every ``dim`` group ('tp', 'dp', 'pp') of the role lies inside one node.

    Rank order inside the span is tp fastest, then dp, then pp (kdtrain/parallel/groups.py)."""
    def rank(t, d, p):
        return pl.rank_offset + t + tp * (d + dp * p)

    if dim == "tp":
        groups = [[rank(t, d, p) for t in range(tp)] for d in (0, dp - 1) for p in (0, pp - 1)]
    elif dim == "dp":
        groups = [[rank(t, d, p) for d in range(dp)] for t in (0, tp - 1) for p in (0, pp - 1)]
    else:
        groups = [[rank(t, d, p) for p in range(pp)] for t in (0, tp - 1) for d in (0, dp - 1)]
    # Groups are translates of each other; the corner groups are the ones that can straddle.
    return all(pl.node(g[0]) == pl.node(g[-1]) for g in groups)


def link(profile: HardwareProfile, intra: bool) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of a link inside or across nodes."""
    if intra:
        return profile.intra_node_bw, profile.intra_node_latency
    return profile.inter_node_bw, profile.inter_node_latency


def allreduce_time(nbytes: float, size: int, bw: float, lat: float) -> float:
    """Ring all-reduce: reduce-scatter + all-gather, 2 (p-1) steps of nbytes/p each."""
    if size <= 1:
        return 0.0
    return 2.0 * (size - 1) / size * nbytes / bw + 2.0 * (size - 1) * lat


@dataclass
class RoleTime:
    """One role's step, split into the parts the bottleneck report names (seconds)."""

    compute: float = 0.0
    tp_comm: float = 0.0
    pp_comm: float = 0.0
    bubble: float = 0.0
    dp_comm: float = 0.0
    optimizer: float = 0.0
    per_microbatch: float = 0.0  # slowest stage, one micro-batch (forward [+ backward])
    forward_per_microbatch: float = 0.0
    gap: float = 0.0  # student: time per step its last stage consumes no payload
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.optimizer

    def parts(self) -> dict[str, float]:
        return {"compute": self.compute, "tp comm": self.tp_comm, "pp comm": self.pp_comm, "bubble": self.bubble,
                "dp reduce": self.dp_comm, "optimizer": self.optimizer}


def _stage_pass(m: ModelShape, tp: int, pp: int, seq: int, micro_batch: int, profile: HardwareProfile,
                passes: int, d: int, graphed: bool = False) -> tuple[float, float, float]:
    """(compute s, tp-comm s, logits s) of one micro-batch on the slowest stage; ``passes`` = 1 for
    a forward, 3 for forward + backward (backward = 2 x forward FLOPs), 4 with recomputation (the
    backward re-runs the layers' forward; the output layer is not recomputed). ``graphed``: the
    layers replay as CUDA graphs (forward and backward: one replay each)."""
    n = seq * micro_batch
    layers = m.layers // pp
    width = min(m.q_width // tp, m.ffn // tp, m.hidden)
    rate = profile.achieved_flops(n, width)
    layer_flops = m.layer_forward_flops(seq) * n / tp
    out_flops = m.output_forward_flops() * n / tp
    # The last stage (layers + output layer) is the slowest: the embedding lookup costs no FLOPs.
    out_passes = min(passes, 3)
    device = (passes * layers * layer_flops + out_passes * out_flops) / rate
    # Memory-bound ops (norms, RoPE, SwiGLU, residuals, copies): the backward moves twice the bytes
    # of the forward, so they scale with the same ``passes``.
    device += passes * layers * n * m.elementwise_width(tp) * profile.elementwise_bytes / profile.memory_bw
    host = layers * (min(passes, 2) * GRAPH_REPLAY_S if graphed else passes * profile.layer_overhead_s)
    compute = max(device, host)
    bw, lat = profile.intra_node_bw, profile.intra_node_latency  # TP groups stay inside a node
    # Two all-reduces per layer per forward (attention and MLP outputs) and two in the backward
    # (their input gradients); a recomputed forward repeats the forward's two.
    ar_per_layer = {1: 2, 3: 4, 4: 6}[passes]
    tp_comm = ar_per_layer * layers * allreduce_time(n * m.hidden * d, tp, bw, lat)
    # The student's KD loss (two passes) reads its logits twice and writes their gradient once;
    # the teacher's top-k costs its own (teacher_logits_bytes).
    logits = 3 * n * m.padded_vocab(tp) / tp * d / profile.memory_bw
    return compute, tp_comm, logits


def teacher_logits_bytes(d: int) -> int:
    """HBM bytes per element of the teacher's logits shard that ``vocab_parallel_topk`` moves
    (stream/payload.py): ``torch.topk`` reads them (d); the tail's eager passes over fp32 chunks
    each go through memory (chunks far above L2): the upcast reads d and writes 4, the shift and
    the exponential read and write 4 each, the sum reads 4. Total 2d + 24 (28 in bf16: 14 reads of
    the bf16 logits), with loss.tau != 1 one more fp32 division (+8), not counted."""
    return 2 * d + 24


def _pp_hop(m: ModelShape, tp: int, pp: int, dp: int, seq: int, micro_batch: int, profile: HardwareProfile,
            pl: Placement, d: int) -> float:
    if pp == 1:
        return 0.0
    bw, lat = link(profile, group_in_one_node(pl, tp, pp, dp, "pp"))
    return lat + seq * micro_batch * m.hidden * d / bw


def teacher_time(m: ModelShape, tp: int, pp: int, dp: int, seq: int, micro_batch: int, microbatches: int, k: int,
                 profile: HardwareProfile, pl: Placement, colocated: bool, d: int = 2) -> RoleTime:
    """One step of the lean teacher: ``microbatches`` forwards per replica (+ top-k)."""
    compute, tp_comm, _ = _stage_pass(m, tp, pp, seq, micro_batch, profile, 1, d)
    n = seq * micro_batch
    logits = n * m.padded_vocab(tp) / tp * teacher_logits_bytes(d) / profile.memory_bw
    bw, lat = profile.intra_node_bw, profile.intra_node_latency
    # Vocab-parallel top-k: two ring all-gathers of each rank's k + 1 candidates (fp32 values,
    # int64 ids) and one all-reduce of the tail's sum, one fp32 per token.
    if tp > 1:
        tp_comm += (tp - 1) * n * (k + 1) * 12 / bw + 2 * (tp - 1) * lat + allreduce_time(4 * n, tp, bw, lat)
    hop = _pp_hop(m, tp, pp, dp, seq, micro_batch, profile, pl, d)
    per_mb = compute + logits + tp_comm + hop
    fill = (pp - 1) * per_mb if colocated else 0.0
    rt = RoleTime(compute=microbatches * (compute + logits), tp_comm=microbatches * tp_comm,
                  pp_comm=microbatches * hop, bubble=fill, per_microbatch=per_mb, forward_per_microbatch=per_mb)
    return rt


def student_time(m: ModelShape, tp: int, pp: int, dp: int, seq: int, micro_batch: int, microbatches: int,
                 profile: HardwareProfile, pl: Placement, payload_bcast_bytes: float = 0.0, d: int = 2,
                 distributed_optimizer: bool = False, recompute: bool = False, graphed: bool = False) -> RoleTime:
    """One 1F1B training step of the student over ``microbatches`` micro-batches per replica
    (``recompute``: full activation recomputation, one more forward per backward; ``graphed``: the
    layers replay as CUDA graphs, which needs tp = pp = 1 and no recomputation).

    ``payload_bcast_bytes``: payload bytes its last stage broadcasts inside its TP group per
    micro-batch (non-zero when the payload arrives from another rank and tp > 1)."""
    assert not graphed or (tp == pp == 1 and not recompute), (tp, pp, recompute)
    f_compute, f_tp, logits = _stage_pass(m, tp, pp, seq, micro_batch, profile, 1, d, graphed)
    fb_compute, fb_tp, _ = _stage_pass(m, tp, pp, seq, micro_batch, profile, 4 if recompute else 3, d, graphed)
    bw_i, lat_i = profile.intra_node_bw, profile.intra_node_latency
    bcast = (payload_bcast_bytes / bw_i + lat_i) if (tp > 1 and payload_bcast_bytes) else 0.0
    hop = _pp_hop(m, tp, pp, dp, seq, micro_batch, profile, pl, d)
    t_f = f_compute + f_tp + logits + bcast + hop
    per_mb = fb_compute + fb_tp + logits + bcast + 2 * hop
    rt = RoleTime(compute=microbatches * (fb_compute + logits), tp_comm=microbatches * (fb_tp + bcast),
                  pp_comm=microbatches * 2 * hop, bubble=(pp - 1) * per_mb, per_microbatch=per_mb,
                  forward_per_microbatch=t_f)
    # Gradient reduction of the fp32 buffer of the largest stage over the dp replicas: an
    # all-reduce, or with ZeRO-1 its reduce-scatter half and an all-gather of the parameters.
    n_max = max(stage_params(m, tp, pp, r) for r in {0, pp - 1})
    bw, lat = link(profile, group_in_one_node(pl, tp, pp, dp, "dp"))
    zero = distributed_optimizer and dp > 1
    rt.dp_comm = (allreduce_time(4.0 * n_max, dp, bw, lat) / 2 + allreduce_time(d * n_max, dp, bw, lat) / 2
                  if zero else allreduce_time(4.0 * n_max, dp, bw, lat))
    if m.tied and pp > 1:  # first/last stage copies of the tied embedding: sum their gradients
        bw_e, lat_e = link(profile, group_in_one_node(pl, tp, pp, dp, "pp"))
        rt.dp_comm += allreduce_time(4.0 * m.padded_vocab(tp) / tp * m.hidden, 2, bw_e, lat_e)
    owned = max(max(owned_params(m, tp, pp, r, dp)) for r in {0, pp - 1}) if zero else n_max
    # Memory-bound passes. Per owned parameter: the fused AdamW reads the fp32 master, gradient and
    # both moments and writes the master and moments back (7 x 4 = 28 B), then the master is
    # copied to the bf16 parameter (4 + d). Per stage parameter, the fp32 gradient buffer is
    # zeroed (4), its norm taken (pow 8 + sum 4) and clipped (8).
    if zero:  # per owned element: AdamW, its master into the all-gather's send buffer (4 + d) and
        # the norm and clip of the reduced chunk (20); per stage element: zeroing the buffer (4)
        # and the gathered parameters copied into place (2d)
        rt.optimizer = (owned * (ADAM_BYTES + 4 + d + GRAD_BUFFER_BYTES - 4) + n_max * (4 + 2 * d)) / profile.memory_bw
    else:
        rt.optimizer = (owned * (ADAM_BYTES + (0 if d == 4 else 4 + d)) + n_max * GRAD_BUFFER_BYTES) / profile.memory_bw
    # The last stage takes no payload before its first forward ((pp-1) forwards of fill), after
    # its last backward, and during the reduction and the update.
    rt.gap = (pp - 1) * t_f + per_mb - t_f + rt.dp_comm + rt.optimizer
    return rt


def sampling_time(m: ModelShape, tp: int, pp: int, seq: int, rows: int, calls: int, prompt: int,
                  profile: HardwareProfile, d: int = 2, graphed: bool = False) -> float:
    """Seconds a student replica spends sampling one step's rows: ``calls`` calls of ``rows`` rows,
    each a forward over the first ``prompt`` positions and one per position after them up to the
    window's ``seq + 1`` tokens (see the module docstring). ``graphed``: each position's model
    forward replays as one CUDA graph (precision.cuda_graphs, tp = pp = 1): its host time is one
    replay instead of the layers' launches."""
    if calls == 0:
        return 0.0
    positions = seq + 1 - prompt
    bw, lat = profile.intra_node_bw, profile.intra_node_latency  # stages and TP groups inside a node
    # The prompt: a forward of rows x prompt tokens through each stage in turn.
    p_compute, p_tp, _ = _stage_pass(m, tp, pp, prompt, rows, profile, 1, d)
    prefill = pp * (p_compute + p_tp) + (pp - 1) * (lat + rows * prompt * m.hidden * d / bw)
    # One decoded position: the whole model's weights and the cache read once for r new tokens.
    context = prompt + positions / 2
    weights = d * sum(stage_params(m, tp, pp, r) for r in range(pp))
    cache = m.layers * rows * context * m.kv_width / tp * d
    flops = rows * (m.layers * m.layer_forward_flops(context) + m.output_forward_flops()) / tp
    width = min(m.q_width // tp, m.ffn // tp, m.hidden)
    device = max((weights + cache) / profile.memory_bw, flops / profile.achieved_flops(rows, width))
    host = profile.decode_host_s(0) + GRAPH_REPLAY_S if graphed else profile.decode_host_s(m.layers)
    tp_comm = (2 * m.layers * allreduce_time(rows * m.hidden * d, tp, bw, lat)
               + 3 * allreduce_time(8 * rows, tp, bw, lat))  # + the draw's three small collectives
    hops = (pp - 1) * (lat + rows * m.hidden * d / bw) + (lat if pp > 1 else 0.0)  # + the tokens' broadcast
    token = max(device, host) + tp_comm + hops
    return calls * (prefill + positions * token)
