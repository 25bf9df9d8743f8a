"""Weight names and layouts: Hugging Face tensors <-> kdtrain global (unsharded) parameters.

kdtrain checkpoints hold each parameter once, under its global megatron-core name and in the
layout of an unpartitioned (TP=1) model, with the real vocabulary only; tensor-parallel slicing
and vocab padding happen at load time (models/params.py). So conversion only has to get the
TP=1 layout right:

* Fused QKV. megatron-core stores ``linear_qkv`` grouped by query group, not as [Q; K; V]:
  ``[q(g0) k(g0) v(g0) | q(g1) k(g1) v(g1) | ...]`` where ``q(g)`` are the ``heads/groups`` query
  heads sharing key/value head ``g``. A contiguous TP split of the rows then hands each tensor rank
  whole groups, which is why the layout is grouped. Bias vectors follow the same order.
* Gated MLP. ``linear_fc1`` is ``[gate; up]`` stacked along the output rows and the MLP computes
  ``silu(first half) * second half``; HF keeps ``gate_proj`` and ``up_proj`` apart.
* GPT-2 uses ``Conv1D`` layers whose weights are ``[in, out]``: transposed relative to
  ``nn.Linear``; its ``c_attn`` is plain [Q; K; V] (every head its own group).
* RoPE: megatron-core's non-interleaved rotary embedding rotates the two halves of each head
  (``rotate_half``), exactly as HF Llama/Qwen2 do, so q/k rows need no permutation.
* Tied embeddings: kdtrain stores only ``embedding.word_embeddings.weight``; HF may or may not
  store ``lm_head.weight`` beside it.
* Qwen3's ``q_norm`` / ``k_norm`` (one RMSNorm weight of the head size, shared by the heads,
  applied before RoPE) are megatron-core's ``q_layernorm`` / ``k_layernorm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ModelConfig

Getter = Callable[[str], torch.Tensor]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global names and shapes of every kdtrain parameter (real vocab, TP=1)."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.kv_channels
    kv = cfg.num_query_groups * cfg.kv_channels
    norm_bias = cfg.normalization == "layernorm"
    out = {"embedding.word_embeddings.weight": (v, h)}
    if cfg.position_embedding == "learned":
        out["embedding.position_embeddings.weight"] = (cfg.max_seq_length, h)
    fc1 = 2 * f if cfg.activation == "swiglu" else f
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            out[p + norm + ".weight"] = (h,)
            if norm_bias:
                out[p + norm + ".bias"] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = (q + 2 * kv, h)
        if cfg.qk_layernorm:
            for norm in ("q_layernorm", "k_layernorm"):
                out[p + f"self_attention.{norm}.weight"] = (cfg.kv_channels,)
                if norm_bias:
                    out[p + f"self_attention.{norm}.bias"] = (cfg.kv_channels,)
        if cfg.add_qkv_bias or cfg.add_bias_linear:
            out[p + "self_attention.linear_qkv.bias"] = (q + 2 * kv,)
        out[p + "self_attention.linear_proj.weight"] = (h, q)
        out[p + "mlp.linear_fc1.weight"] = (fc1, h)
        out[p + "mlp.linear_fc2.weight"] = (h, f)
        if cfg.add_bias_linear:
            out[p + "self_attention.linear_proj.bias"] = (h,)
            out[p + "mlp.linear_fc1.bias"] = (fc1,)
            out[p + "mlp.linear_fc2.bias"] = (h,)
    out["decoder.final_layernorm.weight"] = (h,)
    if norm_bias:
        out["decoder.final_layernorm.bias"] = (h,)
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = (v, h)
    return out


# ---- fused QKV ---------------------------------------------------------------------------------
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[heads*d, ...], [groups*d, ...], [groups*d, ...] -> megatron's grouped [groups*(heads/groups+2)*d, ...]."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
    return fused.reshape(g * (per + 2) * d, *rest)


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``."""
    g, d = cfg.num_query_groups, cfg.kv_channels
    per = cfg.num_attention_heads // g
    rest = fused.shape[1:]
    q, k, v = fused.reshape(g, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
    return (q.reshape(g * per * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


# ---- conversion rules ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """``outputs = fn(*inputs)``: how tensors of one format are computed from tensors of the other.

    Conversion is a list of rules, not one function over whole state dicts, so a caller can
    compute any single tensor from only the tensors it needs: a rank loading a Hugging Face
    directory builds just its own stage's parameters, and the file converters hold one rule's
    tensors at a time instead of the whole model."""

    outputs: tuple[str, ...]
    inputs: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]]
    # What ``fn`` does, for readers that compute only part of an output (hf_weights.py):
    # "copy", "transpose" (of a matrix), "qkv" (fuse_qkv of q, k, v), "gated" ([gate; up]) or "other".
    kind: str = "other"


def _copy(dst: str, src: str) -> Rule:
    return Rule((dst,), (src,), lambda t: (t,), "copy")


def _transposed(dst: str, src: str) -> Rule:
    return Rule((dst,), (src,), lambda t: (t.t().contiguous(),), "transpose")


class RuleSet:
    """The rules of one conversion, indexed by output name."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.by_output = {name: r for r in rules for name in r.outputs}
        assert len(self.by_output) == sum(len(r.outputs) for r in rules), "two rules produce one tensor"

    def outputs(self) -> list[str]:
        return list(self.by_output)

    def inputs(self) -> set[str]:
        return {name for r in self.rules for name in r.inputs}

    @staticmethod
    def run(rule: Rule, get: Getter) -> dict[str, torch.Tensor]:
        out = rule.fn(*(get(name) for name in rule.inputs))
        assert len(out) == len(rule.outputs), rule
        return dict(zip(rule.outputs, out))

    def compute(self, name: str, get: Getter) -> torch.Tensor:
        """One output tensor (its rule's other outputs, if any, are computed and dropped)."""
        return self.run(self.by_output[name], get)[name]


# ---- Llama / Qwen2 / Qwen3 ---------------------------------------------------------------------
def _llama_layer_pairs(i: int, cfg: ModelConfig) -> list[tuple[str, str]]:
    """(kdtrain, HF) names of the 1:1 tensors of layer i."""
    kd, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
    pairs = [(kd + "input_layernorm.weight", hf + "input_layernorm.weight"),
             (kd + "pre_mlp_layernorm.weight", hf + "post_attention_layernorm.weight"),
             (kd + "self_attention.linear_proj.weight", hf + "self_attn.o_proj.weight"),
             (kd + "mlp.linear_fc2.weight", hf + "mlp.down_proj.weight")]
    if cfg.add_bias_linear:
        pairs += [(kd + "self_attention.linear_proj.bias", hf + "self_attn.o_proj.bias"),
                  (kd + "mlp.linear_fc2.bias", hf + "mlp.down_proj.bias")]
    if cfg.qk_layernorm:  # Qwen3: per-head RMSNorm weights of queries and keys
        pairs += [(kd + "self_attention.q_layernorm.weight", hf + "self_attn.q_norm.weight"),
                  (kd + "self_attention.k_layernorm.weight", hf + "self_attn.k_norm.weight")]
    return pairs


def _llama_top_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             ("decoder.final_layernorm.weight", "model.norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    return pairs


def _llama_fused(i: int, cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """(kdtrain fused tensor, its HF parts in order, kind) of layer i: QKV and gate/up."""
    kd, attn, mlp = f"decoder.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv_suffixes = ("weight", "bias") if cfg.add_qkv_bias or cfg.add_bias_linear else ("weight",)
    out = [(kd + f"self_attention.linear_qkv.{s}", tuple(attn + f"{p}_proj.{s}" for p in "qkv"), "qkv")
           for s in qkv_suffixes]
    out += [(kd + f"mlp.linear_fc1.{s}", (mlp + f"gate_proj.{s}", mlp + f"up_proj.{s}"), "gated")
            for s in (("weight", "bias") if cfg.add_bias_linear else ("weight",))]
    return out


def llama_to_kdtrain(cfg: ModelConfig) -> list[Rule]:
    rules = [_copy(kd, hf) for kd, hf in _llama_top_pairs(cfg)]
    for i in range(cfg.num_layers):
        rules += [_copy(kd, hf) for kd, hf in _llama_layer_pairs(i, cfg)]
        for fused, parts, kind in _llama_fused(i, cfg):
            fn = (lambda q, k, v: (fuse_qkv(q, k, v, cfg),)) if kind == "qkv" else \
                (lambda gate, up: (torch.cat([gate, up]),))
            rules.append(Rule((fused,), parts, fn, kind))
    return rules


def kdtrain_to_llama(cfg: ModelConfig) -> list[Rule]:
    rules = [_copy(hf, kd) for kd, hf in _llama_top_pairs(cfg)]
    for i in range(cfg.num_layers):
        rules += [_copy(hf, kd) for kd, hf in _llama_layer_pairs(i, cfg)]
        for fused, parts, kind in _llama_fused(i, cfg):
            fn = (lambda t: split_qkv(t, cfg)) if kind == "qkv" else \
                (lambda t: tuple(c.contiguous() for c in t.chunk(2, dim=0)))
            rules.append(Rule(parts, (fused,), fn))
    return rules


# ---- GPT-2 -------------------------------------------------------------------------------------
def _gpt2_layer_pairs(i: int) -> list[tuple[str, str, bool]]:
    """(kdtrain, HF, transposed) for the tensors of layer i other than c_attn."""
    kd, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
    return [(kd + "input_layernorm.weight", hf + "ln_1.weight", False),
            (kd + "input_layernorm.bias", hf + "ln_1.bias", False),
            (kd + "pre_mlp_layernorm.weight", hf + "ln_2.weight", False),
            (kd + "pre_mlp_layernorm.bias", hf + "ln_2.bias", False),
            (kd + "self_attention.linear_proj.weight", hf + "attn.c_proj.weight", True),
            (kd + "self_attention.linear_proj.bias", hf + "attn.c_proj.bias", False),
            (kd + "mlp.linear_fc1.weight", hf + "mlp.c_fc.weight", True),
            (kd + "mlp.linear_fc1.bias", hf + "mlp.c_fc.bias", False),
            (kd + "mlp.linear_fc2.weight", hf + "mlp.c_proj.weight", True),
            (kd + "mlp.linear_fc2.bias", hf + "mlp.c_proj.bias", False)]


def _gpt2_top_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    pairs = [("embedding.word_embeddings.weight", "transformer.wte.weight"),
             ("embedding.position_embeddings.weight", "transformer.wpe.weight"),
             ("decoder.final_layernorm.weight", "transformer.ln_f.weight"),
             ("decoder.final_layernorm.bias", "transformer.ln_f.bias")]
    if not cfg.tie_embeddings:
        pairs.append(("output_layer.weight", "lm_head.weight"))
    return pairs


def gpt2_to_kdtrain(cfg: ModelConfig) -> list[Rule]:
    h = cfg.hidden_size
    rules = [_copy(kd, hf) for kd, hf in _gpt2_top_pairs(cfg)]
    for i in range(cfg.num_layers):
        kd, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += [(_transposed if t else _copy)(k, name) for k, name, t in _gpt2_layer_pairs(i)]
        # Conv1D c_attn: weight [h, 3h] -> rows [Q; K; V] after the transpose; bias [3h].
        rules.append(Rule((kd + "self_attention.linear_qkv.weight",), (hf + "attn.c_attn.weight",),
                          lambda w: (fuse_qkv(*w.t().split(h), cfg),)))
        rules.append(Rule((kd + "self_attention.linear_qkv.bias",), (hf + "attn.c_attn.bias",),
                          lambda b: (fuse_qkv(*b.split(h), cfg),)))
    return rules


def kdtrain_to_gpt2(cfg: ModelConfig) -> list[Rule]:
    rules = [_copy(hf, kd) for kd, hf in _gpt2_top_pairs(cfg)]
    for i in range(cfg.num_layers):
        kd, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += [(_transposed if t else _copy)(name, k) for k, name, t in _gpt2_layer_pairs(i)]
        rules.append(Rule((hf + "attn.c_attn.weight",), (kd + "self_attention.linear_qkv.weight",),
                          lambda w: (torch.cat(split_qkv(w, cfg)).t().contiguous(),)))
        rules.append(Rule((hf + "attn.c_attn.bias",), (kd + "self_attention.linear_qkv.bias",),
                          lambda b: (torch.cat(split_qkv(b, cfg)),)))
    return rules


# Each maps a model config to its list of rules (RuleSet(TO_KDTRAIN[arch](cfg))).
TO_KDTRAIN = {"LlamaForCausalLM": llama_to_kdtrain, "Qwen2ForCausalLM": llama_to_kdtrain,
              "Qwen3ForCausalLM": llama_to_kdtrain, "GPT2LMHeadModel": gpt2_to_kdtrain}
TO_HF = {"LlamaForCausalLM": kdtrain_to_llama, "Qwen2ForCausalLM": kdtrain_to_llama,
         "Qwen3ForCausalLM": kdtrain_to_llama, "GPT2LMHeadModel": kdtrain_to_gpt2}
# HF tensors that carry no weights (buffers some checkpoints store) and are skipped on import.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
