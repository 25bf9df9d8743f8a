"""Memory model: bytes a rank holds for its role, from the model config and the role's layout.

Static bytes (weights, gradient buffer, optimizer state) are exact: they are counted parameter by
parameter the way megatron-core's ``GPTModel`` (local spec) allocates them and the way kdtrain's
``GradBuffer`` and ``AdamWOptimizer`` (kdtrain/training) hold their state, and a test compares
them with built models. Activations are an estimate (see ``layer_activation_bytes``).

Per rank of a trained student (tp x pp x dp, pipeline stage r, dtype bytes ``d``):

    weights   = d * P_r                       every parameter in the model dtype
    grads     = 4 * P_r                       one fp32 buffer (main_grad), any model dtype
    optimizer = 8 * P_r + 4 * P_r (when d != 4)
                                              Adam m, v (fp32) + fp32 master weights for bf16;
                                              P_r = parameters of stage r's tensor shard
    with the distributed optimizer (ZeRO-1, dp > 1), C = ceil(P_r / dp), O_r = this dp rank's
    share of the flat parameter order (C, the last rank the rest):
    grads     = 4 * dp * C                    the buffer padded to dp chunks (reduced in place)
    optimizer = 12 * O_r + d * (dp + 1) * B   Adam m, v and an fp32 master of the share (also for
                                              fp32 models) + the all-gather's send and receive
                                              buffers, B = min(C, 2**26 // dp) elements per rank
    activations (1F1B) = min(pp - r, M) * (L / pp) * A_layer + (last stage) logits + loss grad
                  full recomputation: A_layer -> d * n * h (each layer keeps only its input),
                  plus one layer's A_layer while that layer is recomputed in the backward
                  on-policy steps: the larger of that and what sampling holds (before the
                  step's forwards): the key/value cache of the stage's layers for the whole
                  window, [S + 1, rows, kv/tp] per layer, plus the prompt forward's transients

The lean teacher holds ``d * P_r`` weights, one micro-batch's transient inference tensors and the
payload buffers (top-k ids/values, tail log-mass, checksum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from ..config import ModelConfig

GiB = 2.0**30


@dataclass(frozen=True)
class ModelShape:
    """The hashable subset of a ``ModelConfig`` the planner needs (configs are mutable)."""

    name: str
    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    vocab_multiple: int
    max_seq: int
    layernorm: bool
    gated: bool
    learned_pos: bool
    tied: bool
    bias: bool
    qkv_bias: bool
    qk_norm: bool = False  # per-head query/key norms (head_dim weights each, replicated over TP)

    @staticmethod
    def of(cfg: ModelConfig) -> "ModelShape":
        if isinstance(cfg, ModelShape):
            return cfg
        if cfg.num_query_groups is None or cfg.kv_channels is None:
            cfg.check(cfg.name)
        return ModelShape(cfg.name, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
                          cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                          cfg.max_seq_length, cfg.normalization == "layernorm", cfg.activation == "swiglu",
                          cfg.position_embedding == "learned", cfg.tie_embeddings, cfg.add_bias_linear,
                          cfg.add_qkv_bias or cfg.add_bias_linear, cfg.qk_layernorm)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return 2 * self.groups * self.head_dim

    def padded_vocab(self, tp: int) -> int:
        m = self.vocab_multiple * tp
        return int(math.ceil(self.vocab / m) * m)

    def layout_ok(self, tp: int, pp: int) -> bool:
        """Same rule as ``ModelConfig.check_layout``: tp divides heads, groups and ffn; pp divides layers."""
        return (self.heads % tp == 0 and self.groups % tp == 0 and self.ffn % tp == 0
                and self.layers % pp == 0)

    # ---- FLOPs (same convention as ModelConfig.flops_per_token) ------------------------------
    def layer_forward_flops(self, seq: int) -> float:
        """Forward FLOPs per token of one transformer layer (matmuls + full S x S attention)."""
        h, q, kv = self.hidden, self.q_width, self.kv_width
        n_mlp = 3 if self.gated else 2
        return 2.0 * (h * (q + kv) + q * h + n_mlp * h * self.ffn) + 4.0 * seq * q

    def elementwise_width(self, tp: int) -> float:
        """Activation elements per token that a layer's memory-bound ops touch on one tensor rank:
        two norms and two residual adds over h, RoPE over q and k, the attention layout copies of
        q, k, v and the output, SwiGLU's gate, up and product (GELU: input and output)."""
        q, kv, f = self.q_width / tp, self.kv_width / tp, self.ffn / tp
        return 4 * self.hidden + 2 * q + 1.5 * kv + (3 if self.gated else 2) * f

    def output_forward_flops(self) -> float:
        return 2.0 * self.vocab * self.hidden


def stage_param_list(m: ModelShape, tp: int, pp: int, pp_rank: int) -> tuple[int, ...]:
    """Sizes of the parameters of one rank (shards of equal size on every tensor rank) of stage
    ``pp_rank``, in megatron-core's ``named_parameters`` order for kdtrain's local layer spec."""
    assert m.layout_ok(tp, pp) and 0 <= pp_rank < pp, (m.name, tp, pp, pp_rank)
    h, f = m.hidden, m.ffn
    q, kv = m.q_width // tp, m.kv_width // tp
    norm = [h, h] if m.layernorm else [h]  # LayerNorm: weight + bias
    vocab_rows = m.padded_vocab(tp) // tp  # padded table, split along the vocabulary
    n_in = 2 if m.gated else 1  # gated fc1 holds [gate; up]
    layer = [*norm, h * q] + ([h] if m.bias else [])  # linear_proj (row-parallel)
    layer += [(q + kv) * h] + ([q + kv] if m.qkv_bias else [])  # linear_qkv
    if m.qk_norm:  # q_layernorm, k_layernorm: over one head, shared by the heads
        layer += [m.head_dim] * (2 if m.layernorm else 1) * 2
    layer += [*norm, n_in * (f // tp) * h] + ([n_in * (f // tp)] if m.bias else [])
    layer += [h * (f // tp)] + ([h] if m.bias else [])  # linear_fc2
    out: list[int] = []
    if pp_rank == 0:
        out.append(vocab_rows * h)
        if m.learned_pos:
            out.append(m.max_seq * h)
    out += layer * (m.layers // pp)
    if pp_rank == pp - 1:
        out += norm  # final norm
        if not (m.tied and pp == 1):  # tied + pp > 1: the last stage keeps its own copy
            out.append(vocab_rows * h)
    return tuple(out)


@lru_cache(maxsize=65536)
def stage_params(m: ModelShape, tp: int, pp: int, pp_rank: int) -> int:
    """Parameters of one rank of stage ``pp_rank``."""
    return sum(stage_param_list(m, tp, pp, pp_rank))


@lru_cache(maxsize=65536)
def owned_params(m: ModelShape, tp: int, pp: int, pp_rank: int, dp: int) -> tuple[int, ...]:
    """Per dp rank, the parameter elements of its share under the distributed optimizer (ZeRO-1):
    equal chunks of the stage's flat parameter order (``kdtrain.training.grads.GradBuffer``),
    ``ceil(P / dp)`` each, the last rank the rest."""
    n = stage_params(m, tp, pp, pp_rank)
    chunk = -(-n // dp)
    return tuple(max(0, min(chunk, n - r * chunk)) for r in range(dp))


GATHER_NUMEL = 2**26  # the all-gather's receive buffer, elements (kdtrain/training/optimizer.py)


def sharded_state_bytes(m: ModelShape, tp: int, pp: int, pp_rank: int, dp: int, dp_rank: int,
                        d: int) -> tuple[float, float]:
    """(gradient bytes, optimizer bytes) of dp rank ``dp_rank`` under the distributed optimizer."""
    n = stage_params(m, tp, pp, pp_rank)
    chunk = -(-n // dp)
    per = max(1, min(chunk, GATHER_NUMEL // dp))
    share = owned_params(m, tp, pp, pp_rank, dp)[dp_rank]
    return 4.0 * dp * chunk, 12.0 * share + d * (dp + 1) * per


def optimizer_bytes(n: int, d: int) -> float:
    """Adam m and v in fp32 for every owned parameter, plus an fp32 master copy when the model
    dtype is not fp32."""
    return float(8 * n + (0 if d == 4 else 4 * n))


def payload_nbytes(seq: int, micro_batch: int, k: int, values_bytes: int = 4) -> int:
    """Bytes of one teacher payload (kdtrain/stream/payload.py layout): checksum int64, tail_lse fp32
    per token, top-k ids int32 and values (fp32 or bf16) per token."""
    n = seq * micro_batch
    return 8 + 4 * n + 4 * n * k + values_bytes * n * k


# ---- activations -------------------------------------------------------------------------------
def layer_activation_bytes(m: ModelShape, tp: int, tokens: int, d: int = 2) -> float:
    """Bytes one transformer layer keeps for backward per micro-batch of ``tokens`` tokens
    (no sequence parallelism, no recomputation, flash/efficient SDPA, dropout 0).

    What autograd saves, per token, on each tensor rank (widths q = heads*head_dim/tp,
    kv = 2*groups*head_dim/tp, f = ffn/tp):
      input norm: its input h (+ fp32 rstd)       qkv matmul: its input h
      mixed qkv output q + kv (v is a view of it)  RoPE'd q and k: q + kv/2
      SDPA output q (+ fp32 log-sum-exp per head) proj matmul input (a reshaped copy): q
      pre-MLP norm: its input h (+ fp32 rstd)     fc1 matmul: its input h
      fc1 output (gate and up; SiLU's input is a view): 2f   SiLU output: f   fc2 input: f
    GELU MLPs keep fc1 output f and GELU output f. LayerNorm also keeps an fp32 mean. Query/key
    norms (Qwen3) keep their inputs as contiguous tensors, q + kv/2, and an fp32 rstd per head
    (measured on CPU with saved-tensor hooks: exactly that per token).

    Norm weights are in the model dtype (models/gpt.py), so torch's fused RMSNorm keeps only its
    input and the fp32 rstd. (With the fp32 norm weights megatron-core creates, the unfused upcast
    path kept 6h more bytes per norm in bf16; the H100 comparison in docs/planner.md was measured
    that way and is owed a re-run.)
    """
    h, q, kv, f = m.hidden, m.q_width / tp, m.kv_width / tp, m.ffn / tp
    mlp = (2 * f + f + f) if m.gated else (f + f)
    per_token = d * (4 * h + (q + kv) + (q + kv / 2) + q + q + mlp)
    per_token += 4 * (m.heads / tp)  # SDPA log-sum-exp, fp32
    per_token += 2 * 4 * (2 if m.layernorm else 1)  # norm statistics, fp32
    if m.qk_norm:
        per_token += d * (q + kv / 2) + 4 * (m.heads + m.groups) / tp * (2 if m.layernorm else 1)
    return per_token * tokens


def layer_inference_bytes(m: ModelShape, tp: int, tokens: int, d: int = 2) -> float:
    """Peak live bytes inside one layer's no-grad forward: the residual stream plus the larger of
    the attention block (norm out, mixed qkv, RoPE'd q/k, SDPA out, reshaped copy) and the MLP
    block (norm out, fc1 out, activation, product)."""
    h, q, kv, f = m.hidden, m.q_width / tp, m.kv_width / tp, m.ffn / tp
    attn = h + (q + kv) + (q + kv / 2) + 2 * q + ((q + kv / 2) if m.qk_norm else 0)  # + normed q/k
    mlp = h + ((2 * f + f + f) if m.gated else 2 * f)
    return d * (h + max(attn, mlp)) * tokens


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank of one role (the worst pipeline stage unless said otherwise)."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    payload: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.static + self.activations + self.payload

    def as_gib(self) -> dict:
        return {k: round(getattr(self, k) / GiB, 3) for k in ("weights", "grads", "optimizer", "activations",
                                                               "payload", "total")}


def sampling_bytes(m: ModelShape, tp: int, pp: int, pp_rank: int, seq: int, rows: int, prompt: int,
                   d: int = 2) -> float:
    """Peak bytes a student stage holds while it samples ``rows`` windows of ``seq + 1`` tokens
    in one call (models/generate.py): the preallocated key/value cache of its layers,
    ``2 x [seq + 1, rows, groups/tp, head_dim]`` each, plus the first forward over the ``prompt``
    positions (one layer's inference tensors, the hidden states sent or received between stages,
    and on the last stage the fp32 logits of the last position and the sampler's copies of them)."""
    kv = (m.layers // pp) * (seq + 1) * rows * m.kv_width / tp * d
    tokens = rows * prompt
    act = layer_inference_bytes(m, tp, tokens, d) + (d * tokens * m.hidden if pp > 1 else 0)
    if pp_rank == pp - 1:
        act += 3 * 4 * rows * m.padded_vocab(tp) / tp
    return float(kv + act)


def student_stage_memory(m: ModelShape, tp: int, pp: int, dp: int, pp_rank: int, seq: int, micro_batch: int,
                         microbatches: int, payload_bytes: float = 0.0, d: int = 2,
                         distributed_optimizer: bool = False, recompute: bool = False,
                         sampling: float = 0.0) -> RankMemory:
    """A trained student rank on stage ``pp_rank`` running 1F1B over ``microbatches`` micro-batches
    (per replica) of ``micro_batch`` samples; ``payload_bytes`` = payload buffers it holds.
    ``recompute``: full activation recomputation (every layer re-runs its forward in the backward).
    ``sampling``: bytes its on-policy sampling holds (``sampling_bytes``; before the step's
    forwards, so the larger of the two counts)."""
    n = stage_params(m, tp, pp, pp_rank)
    if distributed_optimizer and dp > 1:
        grads, opt = sharded_state_bytes(m, tp, pp, pp_rank, dp, 0, d)  # rank 0 holds a full chunk
    else:
        grads, opt = 4.0 * n, optimizer_bytes(n, d)
    tokens = seq * micro_batch
    # 1F1B: stage r keeps the activations of min(pp - r, M) micro-batches in flight.
    in_flight = min(pp - pp_rank, microbatches)
    per_layer = layer_activation_bytes(m, tp, tokens, d)
    if recompute:  # checkpoints (layer inputs) of every micro-batch in flight + one live layer
        act = in_flight * (m.layers // pp) * d * tokens * m.hidden + per_layer
    else:
        act = in_flight * (m.layers // pp) * per_layer
    act += 2 * d * tokens * m.hidden if pp > 1 else 0  # p2p receive buffers (activation, gradient)
    if pp_rank == pp - 1:
        # Final norm input and output-layer input, then the vocab-parallel logits and the KD
        # loss's logit gradient (computed in the forward), both in the model dtype.
        act += d * 2 * tokens * m.hidden + 2 * d * tokens * m.padded_vocab(tp) / tp
    return RankMemory(float(d * n), grads, opt, float(max(act, sampling)), float(payload_bytes))


def teacher_stage_memory(m: ModelShape, tp: int, pp: int, pp_rank: int, seq: int, micro_batch: int, k: int,
                         payload_bytes: float = 0.0, d: int = 2) -> RankMemory:
    """A lean teacher rank: weights + one micro-batch's inference tensors + payload buffers."""
    n = stage_params(m, tp, pp, pp_rank)
    tokens = seq * micro_batch
    act = layer_inference_bytes(m, tp, tokens, d)
    act += 2 * d * tokens * m.hidden if pp > 1 else 0  # p2p buffers
    if pp_rank == pp - 1:
        vl = m.padded_vocab(tp) / tp
        # Logits + the fp32 chunk of the normaliser pass (at most 256 MiB, payload.py) + top-k
        # candidates (fp32 values, int64 ids) of every tensor rank after the all-gather.
        act = max(act, d * tokens * vl + min(4 * tokens * vl, 256 * 2**20) + (tp + 1) * tokens * k * 12)
    return RankMemory(float(d * n), 0.0, 0.0, float(act), float(payload_bytes))


def worst_stage(fn, pp: int) -> RankMemory:
    """The stage with the largest total of ``fn(pp_rank)``."""
    return max((fn(r) for r in range(pp)), key=lambda mem: mem.total)
