"""A direct forward for megatron-core's ``TransformerLayer`` on the local (non-TE) spec.

Small models are bound by host time, not by the GPU: megatron-core's layer forward goes through
offload contexts, NVTX ranges, a custom autograd ``Function`` per linear (even with one tensor-
parallel rank), a bias-dropout-add closure and a rotary embedding that recomputes ``cos``/``sin``
of the same table for the query and the key of every layer. On CPU at tiny shapes (host cost
only; benchmarks/results/layer_host_cpu/, decoder stack alone) the stock forward costs 1.24 ms
per layer and 2.65 ms forward + backward, this one 0.60 / 1.60 ms, no more than Hugging Face's
Llama decoder layer.

``DirectTransformerLayer`` keeps the stock module tree (same submodules, parameter names, state
dict, checkpoints and conversions) and replaces only ``forward`` for the configurations kdtrain
builds: dense pre-norm GPT layers, causal self-attention on SDPA (with or without per-head query
and key norms; over the window, or within documents given a ``DocumentMask``: documents.py), no
inference context, packed sequences or cross-attention. It runs the same operations in the same
order, so its outputs and gradients equal the stock layer's (bitwise on CPU, tests/test_layer.py).
With ``recompute`` (training.recompute) the forward runs under non-reentrant activation
checkpointing. Differences in how, not what:

- Linears of a one-rank tensor-parallel group are ``F.linear`` (+ bias as a separate add, as
  megatron does); with tp > 1 the megatron modules run, keeping their overlapped gradient
  all-reduce.
- ``cos``/``sin`` of the rotary table are computed once per table object (megatron-core caches
  the table per sequence length, so once per run) instead of twice per layer per pass.
- Dropout runs only when its probability is non-zero (``F.dropout`` with ``p=0`` is identity).

Anything else (a call with an inference context, packed sequences, partial rotary, a config this
forward does not cover) goes to the stock forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.utils.checkpoint import checkpoint

from .attention import SDPAttention
from .documents import DocumentMask


def _qk_norms(attn) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """The (query, key) norms of a self-attention, or None when it has none."""
    q, k = getattr(attn, "q_layernorm", None), getattr(attn, "k_layernorm", None)
    if (q is None or isinstance(q, IdentityOp)) and (k is None or isinstance(k, IdentityOp)):
        return None
    return q, k


def direct_forward_supported(layer: TransformerLayer) -> bool:
    """The layer is one this forward computes exactly like the stock one."""
    cfg, attn = layer.config, layer.self_attention
    norms = _qk_norms(attn)
    return (
        isinstance(attn.core_attention, SDPAttention)
        and isinstance(layer.cross_attention, IdentityOp)
        and (norms is None or not any(n is None or isinstance(n, IdentityOp) for n in norms))
        and not getattr(layer, "is_moe_layer", False)
        and cfg.num_query_groups >= attn.world_size  # else megatron all-gathers the qkv projection
        and not cfg.sequence_parallel
        and not cfg.rotary_interleaved
        and not cfg.attention_output_gate
        and not cfg.no_rope_freq
        and not hasattr(cfg, "yarn_rotary_scaling_factor")  # YaRN scales cos/sin (mscale)
        and not cfg.fp32_residual_connection
        and cfg.activation_func_clamp_value is None
        and cfg.recompute_granularity is None
        and not cfg.cpu_offloading
        and not getattr(cfg, "fine_grained_activation_offloading", False)
        and not layer.recompute_input_layernorm
        and not layer.recompute_pre_mlp_layernorm
        and not layer.recompute_mlp
    )


def _linear(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A megatron Column/RowParallelLinear's ``(output, bias)`` pair. One rank: no communication,
    so ``matmul(x, W^T)`` (+ bias unless the module defers it to the caller), as its autograd
    Function computes; more ranks: the module itself."""
    if module.tp_group.size() > 1:
        return module(x)
    out = F.linear(x, module.weight)
    bias = module.bias
    if bias is None:
        return out, None
    if module.skip_bias_add:
        return out, bias
    return out + bias, None


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      causal: bool, scale: Optional[float], hpg: int) -> torch.Tensor:
    """SDPA of queries [b, heads, n, d] over a key/value cache [b, groups, total, d], query head h
    reading group h // hpg. With a mask CUDA's flash kernel is out and the memory-efficient one
    takes no grouped heads, so SDPA would fall back to the math kernel (scores [b, heads, n,
    total], the cache copied per head, at every call). One new position per row (decoding): each
    group's query heads become its queries, [b, groups, hpg, d], under the mask row repeated (a
    stride-0 view), with no grouped heads left: the same products. Several (a prompt): each query
    head gets its group's keys and values, as in training (attention.py)."""
    if mask is None or hpg == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=hpg > 1)
    b, heads, n, d = q.shape
    if n == 1:
        groups = heads // hpg
        out = F.scaled_dot_product_attention(q.reshape(b, groups, hpg, d), k, v,
                                             attn_mask=mask.expand(b, 1, hpg, mask.shape[-1]), scale=scale)
        return out.reshape(b, heads, 1, d)
    k, v = k.repeat_interleave(hpg, dim=1), v.repeat_interleave(hpg, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class DirectTransformerLayer(TransformerLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._direct = direct_forward_supported(self)
        attn = self.self_attention
        self._heads_per_group = attn.num_attention_heads_per_partition // attn.num_query_groups_per_partition
        self._head_dim = attn.hidden_size_per_attention_head
        self._rope_cache: tuple = ()
        self._qk_norms = _qk_norms(attn)
        self.graphs = None  # a LayerGraphs when precision.cuda_graphs (cuda_graphs.py); not a submodule
        self.recompute = False  # training.recompute: keep only the input for the backward (build_gpt sets it)

    @property
    def direct(self) -> bool:
        """Whether calls go to the direct forward (else to megatron-core's stock forward)."""
        return self._direct

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, padding_mask=None, **kwargs):
        if (not self._direct or context is not None or rotary_pos_cos is not None
                or rotary_pos_cos_sin is not None or attention_bias is not None
                or inference_context is not None or packed_seq_params is not None or kwargs
                or (rotary_pos_emb is not None and rotary_pos_emb.shape[-1] != self._head_dim)):
            if isinstance(attention_mask, DocumentMask):
                raise ValueError(f"data.attention: documents: layer {self.layer_number} runs megatron-core's stock "
                                 "forward here, which has no attention within documents (kdtrain/models/layer.py)")
            return super().forward(
                hidden_states, attention_mask=attention_mask, context=context, context_mask=context_mask,
                rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                inference_context=inference_context, packed_seq_params=packed_seq_params,
                sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs)
        if isinstance(attention_mask, DocumentMask):  # per-row rotary positions, the documents' mask
            if rotary_pos_emb is not None:
                rotary_pos_emb = attention_mask.rope(rotary_pos_emb)
            attention_mask = attention_mask.bias(hidden_states.dtype)
        if self.graphs is not None:
            out = self.graphs.run(self, hidden_states, attention_mask, rotary_pos_emb)
            if out is not None:
                return out, None
        if self.recompute and torch.is_grad_enabled() and hidden_states.requires_grad:
            # Full recomputation: autograd keeps the layer's inputs, not its activations, and runs
            # the forward again when the backward reaches it. Non-reentrant checkpointing restores
            # the RNG state first (dropout draws the same masks), and torch.compile traces it.
            return checkpoint(self.direct_forward, hidden_states, attention_mask, rotary_pos_emb,
                              use_reentrant=False), None
        return self.direct_forward(hidden_states, attention_mask, rotary_pos_emb), None

    def direct_forward(self, hidden_states: torch.Tensor, attention_mask,
                       freqs: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's output hidden states (what CUDA graphs capture, cuda_graphs.py)."""
        return self._mlp(self._attention(hidden_states, attention_mask, freqs))

    def _attention(self, x: torch.Tensor, attention_mask, freqs: Optional[torch.Tensor]) -> torch.Tensor:
        attn = self.self_attention
        seq, batch = x.shape[0], x.shape[1]
        qkv, _ = _linear(attn.linear_qkv, self.input_layernorm(x))
        # Per query group the projection holds [its query heads | one key | one value] (megatron's
        # layout): [s, b, groups * (heads_per_group + 2) * d] -> [s, b, groups, ...] -> split.
        d, hpg = self._head_dim, self._heads_per_group
        qkv = qkv.view(seq, batch, -1, (hpg + 2) * d)
        if self._qk_norms is not None:
            # Qwen3: each head's query and key normalised before the rotary embedding, as
            # megatron-core's get_query_key_value_tensors does; then one rotation each.
            query, key, value = torch.split(qkv, [hpg * d, d, d], dim=3)
            # The norms' backward gets a contiguous gradient, as behind megatron-core's rotary
            # embedding (whose concatenation makes one), so their weight gradients sum in the same
            # order: bitwise-equal to the stock layer, at one gradient copy per norm.
            query = _ContiguousGrad.apply(self._qk_norms[0](query.reshape(seq, batch, -1, d)))
            key = _ContiguousGrad.apply(self._qk_norms[1](key))
            if freqs is not None:
                cos, sin = self.rope_tables(freqs, qkv.dtype)
                query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        elif freqs is None:
            query, key, value = torch.split(qkv, [hpg * d, d, d], dim=3)
        else:
            # The query heads and the key of a group are adjacent: one rotation for both (the same
            # elementwise operations as rotating each, in half the kernels), then split.
            qk, value = torch.split(qkv, [(hpg + 1) * d, d], dim=3)
            cos, sin = self.rope_tables(freqs, qkv.dtype)
            qk = _rotate(qk.view(seq, batch, -1, hpg + 1, d), cos.unsqueeze(-2), sin.unsqueeze(-2))
            query, key = qk[..., :hpg, :], qk[..., hpg, :]
        query = query.reshape(seq, batch, -1, d)
        out, bias = _linear(attn.linear_proj, attn.core_attention(query, key, value, attention_mask))
        return self._bias_dropout_add(out, bias, x)

    def cached_forward(self, x: torch.Tensor, cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]],
                       kv: tuple[torch.Tensor, torch.Tensor], offset, allowed: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """No-grad forward of ``n`` new positions ``[offset, offset + n)`` of ``x`` [n, b, h] with a
        key/value cache (generate.py): their keys and values go into ``kv`` (two ``[max_len, b,
        groups, head_dim]`` tensors), and the queries attend to cached positions ``<= own``, or to
        those ``allowed`` [b, 1, n, offset + n] marks (attention within documents). The same
        operations as ``direct_forward`` on the whole sequence; ``cos_sin``: the rotary tables of
        the new positions, ``[n, 1, 1, d]`` or per row ``[n, b, 1, d]`` (None without rotary
        embedding).

        ``offset`` as a one-element device tensor (one new position, decode_graph.py): the same
        with fixed shapes, nothing read on the host, so the call can be captured in a CUDA graph:
        the key and value go to that slot, and the query attends over the whole cache under
        ``allowed`` [b, 1, 1, max_len] (required; unwritten slots must hold finite values, e.g.
        zeros, since a masked key still multiplies its value by a zero weight)."""
        assert self._direct, "cached_forward needs a layer the direct forward covers"
        attn = self.self_attention
        n, batch = x.shape[0], x.shape[1]
        d, hpg = self._head_dim, self._heads_per_group
        qkv, _ = _linear(attn.linear_qkv, self.input_layernorm(x))
        query, key, value = torch.split(qkv.view(n, batch, -1, (hpg + 2) * d), [hpg * d, d, d], dim=3)
        query = query.reshape(n, batch, -1, d)
        if self._qk_norms is not None:
            query, key = self._qk_norms[0](query), self._qk_norms[1](key)
        if cos_sin is not None:
            query, key = _rotate(query, *cos_sin), _rotate(key, *cos_sin)
        k_cache, v_cache = kv
        if isinstance(offset, torch.Tensor):
            assert n == 1 and allowed is not None, (n, allowed is None)
            k_cache.index_copy_(0, offset, key)
            v_cache.index_copy_(0, offset, value)
            keys, values, total = k_cache, v_cache, k_cache.shape[0]
        else:
            k_cache[offset:offset + n] = key
            v_cache[offset:offset + n] = value
            total = offset + n
            keys, values = k_cache[:total], v_cache[:total]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, keys, values))
        if allowed is not None:
            mask, causal = allowed, False
        elif n == 1:  # one new query sees every cached key
            mask, causal = None, False
        elif offset == 0:
            mask, causal = None, True
        else:  # query i sits at offset + i
            mask = torch.arange(total, device=x.device)[None, :] <= torch.arange(offset, total, device=x.device)[:, None]
            causal = False
        out = _cached_attention(q, k, v, mask, causal, attn.core_attention.softmax_scale, hpg)
        out, bias = _linear(attn.linear_proj, out.permute(2, 0, 1, 3).reshape(n, batch, -1))
        return self._mlp(self._bias_dropout_add(out, bias, x))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h, bias = _linear(mlp.linear_fc1, self.pre_mlp_layernorm(x))
        if bias is not None:
            h = h + bias
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            if self.config.glu_linear_offset != 0.0:
                up = up + self.config.glu_linear_offset
            h = self.config.activation_func(gate) * up
        else:
            h = self.config.activation_func(h)
        out, bias = _linear(mlp.linear_fc2, h)
        return self._bias_dropout_add(out, bias, x)

    def _bias_dropout_add(self, out: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        if bias is not None:
            out = out + bias
        if self.training and self.hidden_dropout > 0.0:
            out = F.dropout(out, p=self.hidden_dropout, training=True)
        return residual + out

    def rope_tables(self, freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` of the rotary table ``[s, 1, 1, rot_dim]`` in the activations' dtype,
        as megatron computes them per call. Cached per table object (a strong reference, so an id
        is never reused); under torch.compile computed in the graph, where it fuses for free."""
        if torch.compiler.is_compiling():
            return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
        key = (freqs, dtype, torch.is_inference_mode_enabled())
        cached = self._rope_cache
        if not cached or cached[0] is not freqs or cached[1:3] != key[1:]:
            self._rope_cache = cached = key + (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
        return cached[3], cached[4]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the whole head, non-interleaved: ``t * cos + rotate_half(t) * sin``
    with ``rotate_half([a, b]) = [-b, a]``."""
    t1, t2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin
