"""Hugging Face ``config.json`` <-> kdtrain ``ModelConfig``.

Four architectures are supported, each a fixed combination of ModelConfig fields:

    LlamaForCausalLM   rmsnorm + swiglu + rope (+ Llama-3 rope scaling), optional attention+MLP biases
    Qwen2ForCausalLM   rmsnorm + swiglu + rope, bias on the QKV projection only
    Qwen3ForCausalLM   rmsnorm + swiglu + rope, RMSNorm of each head's query and key, no biases
    GPT2LMHeadModel    layernorm + gelu/gelu_tanh + learned positions, biases on every linear layer

Both the transformers 4.x spelling of RoPE (``rope_theta`` + ``rope_scaling``) and the 5.x one
(``rope_parameters``) are read; export writes both so either major version loads the result.
Anything the kdtrain GPT cannot reproduce exactly (sliding windows, other RoPE variants, partial
rotary, biases on only some projections) is refused with a ValueError naming the key.
Dropout is not imported: it is a training choice (kdtrain defaults to none, as TRL's GKD does
by disabling it), and export writes the model config's own dropout rates.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import ModelConfig, from_dict, to_dict

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel")
ARCH_SHORT = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gpt2": "GPT2LMHeadModel"}
# The only Llama-3 frequency-scaling constants megatron-core's RotaryEmbedding implements.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh"}
# The token ids generation reads from config.json, and what transformers assumes where a file
# leaves one out (its config classes' defaults): an exported config.json always states all three,
# so a missing id can never turn into Llama's 1 / 2.
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DEFAULT_SPECIAL_IDS = {"LlamaForCausalLM": (1, 2, None), "GPT2LMHeadModel": (50256, 50256, None)}


def architecture_of(hf: dict, where: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if known:
        return known[0]
    by_type = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gpt2": "GPT2LMHeadModel"}
    if not archs and hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    raise ValueError(f"{where}: architectures={archs} (model_type={hf.get('model_type')!r}) is not supported; "
                     f"kdtrain converts {list(ARCHITECTURES)}")


def _rope(hf: dict, where: str) -> tuple[float, Optional[float]]:
    """(rope_theta, Llama-3 scaling factor or None) from either transformers spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    spec = params if params.get("rope_type", "default") != "default" else scaling
    kind = spec.get("rope_type", spec.get("type", "default"))
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{where}: rope_type {kind!r} is not supported (only default and llama3)")
    for key, value in LLAMA3_ROPE.items():
        if float(spec.get(key, value)) != value:
            raise ValueError(f"{where}: rope {key}={spec.get(key)} is not supported "
                             f"(the kdtrain GPT implements Llama-3 scaling with {key}={value})")
    if spec.get("factor") is None:
        raise ValueError(f"{where}: rope_type 'llama3' needs its scaling 'factor'")
    return float(theta), float(spec["factor"])


def _get(hf: dict, key: str, where: str, default: Any = None):
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is None:
        raise ValueError(f"{where}: required key {key!r} is missing")
    return default


def model_config_from_hf(hf: dict, name: str, where: str = "config.json") -> tuple[ModelConfig, str]:
    """A ModelConfig reproducing the HF model, and its architecture name."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: not a JSON object (got a {type(hf).__name__})")
    arch = architecture_of(hf, where)
    if arch == "GPT2LMHeadModel":
        act = _get(hf, "activation_function", where, "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise ValueError(f"{where}: activation_function {act!r} is not supported ({sorted(GPT2_ACTIVATIONS)})")
        for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if hf.get(key):
                raise ValueError(f"{where}: {key}=true is not supported")
        if hf.get("scale_attn_weights", True) is False:
            raise ValueError(f"{where}: scale_attn_weights=false is not supported")
        h = _get(hf, "n_embd", where)
        raw = dict(num_layers=_get(hf, "n_layer", where), hidden_size=h, num_attention_heads=_get(hf, "n_head", where),
                   ffn_hidden_size=hf.get("n_inner") or 4 * h, vocab_size=_get(hf, "vocab_size", where),
                   max_seq_length=_get(hf, "n_positions", where), normalization="layernorm",
                   norm_epsilon=_get(hf, "layer_norm_epsilon", where, 1e-5), activation=GPT2_ACTIVATIONS[act],
                   position_embedding="learned", tie_embeddings=hf.get("tie_word_embeddings", True),
                   add_bias_linear=True, init_std=_get(hf, "initializer_range", where, 0.02))
    else:
        act = _get(hf, "hidden_act", where, "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act {act!r} is not supported (SwiGLU needs silu)")
        if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ValueError(f"{where}: sliding-window layers (use_sliding_window / layer_types) are not supported "
                             "(full causal attention only)")
        theta, factor = _rope(hf, where)
        heads = _get(hf, "num_attention_heads", where)
        h = _get(hf, "hidden_size", where)
        # transformers' Qwen3 default head_dim is 128 whatever the hidden size; the others derive it.
        head_dim = hf.get("head_dim") or (128 if arch == "Qwen3ForCausalLM" else h // heads)
        bias_all = qkv_bias = qk_norm = False
        if arch == "Qwen3ForCausalLM":
            if hf.get("attention_bias"):
                raise ValueError(f"{where}: attention_bias=true is not supported for Qwen3ForCausalLM (biases on "
                                 "the attention projections but not the MLP)")
            qk_norm = True
        elif arch == "LlamaForCausalLM":
            attn_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
            if attn_bias != mlp_bias:
                raise ValueError(f"{where}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                                 "(kdtrain puts biases on all linear layers or on none)")
            bias_all = attn_bias
        else:
            qkv_bias = True  # Qwen2: q/k/v projections always carry a bias, o_proj and the MLP never
        raw = dict(num_layers=_get(hf, "num_hidden_layers", where), hidden_size=h, num_attention_heads=heads,
                   num_query_groups=hf.get("num_key_value_heads") or heads, kv_channels=head_dim,
                   ffn_hidden_size=_get(hf, "intermediate_size", where), vocab_size=_get(hf, "vocab_size", where),
                   max_seq_length=_get(hf, "max_position_embeddings", where), normalization="rmsnorm",
                   norm_epsilon=_get(hf, "rms_norm_eps", where, 1e-6), activation="swiglu", position_embedding="rope",
                   rope_theta=theta, rope_scaling_factor=factor,
                   tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   add_bias_linear=bias_all, add_qkv_bias=qkv_bias, qk_layernorm=qk_norm,
                   init_std=_get(hf, "initializer_range", where, 0.02))
    raw["name"] = name
    try:
        return from_dict(ModelConfig, raw, "model"), arch
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def special_ids_from_hf(hf: dict, arch: str) -> dict:
    """``{bos,eos,pad}_token_id`` as transformers reads them from ``hf`` (a config.json): the stored
    value (an int, a list of ints for several end tokens, or None) or the class default."""
    defaults = _DEFAULT_SPECIAL_IDS.get(arch, (None, None, None))
    return {key: hf.get(key, default) for key, default in zip(SPECIAL_IDS, defaults)}


def default_architecture(cfg: ModelConfig) -> str:
    """The HF architecture a kdtrain model exports to."""
    if cfg.normalization == "layernorm" or cfg.position_embedding == "learned" or cfg.activation != "swiglu":
        return "GPT2LMHeadModel"
    if cfg.qk_layernorm:
        return "Qwen3ForCausalLM"
    if cfg.add_qkv_bias and not cfg.add_bias_linear and cfg.rope_scaling_factor is None:
        return "Qwen2ForCausalLM"
    return "LlamaForCausalLM"


def _require(cfg: ModelConfig, arch: str, **expected) -> None:
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"model {cfg.name!r}: {key}={getattr(cfg, key)!r} cannot be exported as {arch} "
                             f"(needs {key}={value!r})")


def hf_config_from_model(cfg: ModelConfig, arch: Optional[str] = None, dtype: str = "float32",
                         special_ids: Optional[dict] = None) -> dict:
    """config.json contents for ``cfg`` (``arch``: an architecture name or llama/qwen2/gpt2);
    ``special_ids``: ``{bos,eos,pad}_token_id`` (written as given, None for the ones not known)."""
    arch = ARCH_SHORT.get(arch, arch) if arch else default_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch {arch!r}: not one of {list(ARCH_SHORT)}")
    if arch == "GPT2LMHeadModel":
        _require(cfg, arch, normalization="layernorm", position_embedding="learned", add_bias_linear=True,
                 qk_layernorm=False,
                 num_query_groups=cfg.num_attention_heads, kv_channels=cfg.hidden_size // cfg.num_attention_heads)
        if cfg.activation not in ("gelu", "gelu_tanh"):
            raise ValueError(f"model {cfg.name!r}: activation={cfg.activation!r} cannot be exported as {arch}")
        out = {"architectures": [arch], "model_type": "gpt2", "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
               "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_hidden_size, "n_positions": cfg.max_seq_length,
               "vocab_size": cfg.vocab_size, "layer_norm_epsilon": cfg.norm_epsilon,
               "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_new",
               "resid_pdrop": cfg.hidden_dropout, "embd_pdrop": cfg.hidden_dropout,
               "attn_pdrop": cfg.attention_dropout, "scale_attn_weights": True,
               "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    else:
        _require(cfg, arch, normalization="rmsnorm", position_embedding="rope", activation="swiglu",
                 qk_layernorm=arch == "Qwen3ForCausalLM")
        rope_v5 = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        rope_scaling = None
        if cfg.rope_scaling_factor is not None:
            if arch != "LlamaForCausalLM":
                raise ValueError(f"model {cfg.name!r}: rope_scaling_factor is exported as LlamaForCausalLM only")
            rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE}
            rope_v5 = {**rope_scaling, "rope_theta": cfg.rope_theta}
        out = {"architectures": [arch], "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
               "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_query_groups,
               "head_dim": cfg.kv_channels, "intermediate_size": cfg.ffn_hidden_size, "vocab_size": cfg.vocab_size,
               "max_position_embeddings": cfg.max_seq_length, "rms_norm_eps": cfg.norm_epsilon, "hidden_act": "silu",
               "attention_dropout": cfg.attention_dropout, "rope_theta": cfg.rope_theta,
               "rope_scaling": rope_scaling, "rope_parameters": rope_v5}
        if arch == "LlamaForCausalLM":
            if cfg.add_qkv_bias and not cfg.add_bias_linear:  # Llama: biases on all projections or none
                raise ValueError(f"model {cfg.name!r}: add_qkv_bias without add_bias_linear cannot be exported as "
                                 f"{arch} (use --arch qwen2)")
            out.update(model_type="llama", attention_bias=cfg.add_bias_linear, mlp_bias=cfg.add_bias_linear)
        elif arch == "Qwen2ForCausalLM":
            _require(cfg, arch, add_qkv_bias=True, add_bias_linear=False)
            out.update(model_type="qwen2", use_sliding_window=False)
        else:
            _require(cfg, arch, add_qkv_bias=False, add_bias_linear=False)
            out.update(model_type="qwen3", attention_bias=False, use_sliding_window=False)
    out.update({key: (special_ids or {}).get(key) for key in SPECIAL_IDS})
    out.update(tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, dtype=dtype,
               torch_dtype=dtype, kdtrain_model=to_dict(cfg))
    return out
